"""Edge-cloud collaboration: a small model on the device answers what it can, a large one in the
cloud answers the rest, and the user sees one OpenAI-compatible endpoint.

- `confidence`: token-level confidence strategies (a registry) aggregated over an answer;
- `policy`: when to ask the cloud (a YAML file that `calibrate` writes);
- `client`: the async HTTP client to the cloud (pool, time bound, retries, breaker, fault injection);
- `router`: the edge answers, the policy decides, the cloud is asked, failures fall back to the edge;
- `server`: `edgelmm collab serve`, `edgelmm serve` with the router in front of its engine;
- `session`, `calibrate`, `ablate`: running task samples through a router, fitting policies,
  routing curves and the ablation matrix; `chat`: `collab run` and the terminal chat.

The cloud is any OpenAI-compatible server; nothing here is required of it beyond that API.
"""
