"""An OpenAI-compatible server over any in-process backend (`edgelmm serve`).

    app.py        routes, auth, limits, SSE
    engine.py     the one thread that owns the model: queue, batching, streaming, cancellation
    responses.py  results in the OpenAI response shapes (logprobs, usage, vLLM's extensions)
    errors.py     OpenAI error objects
    schemas.py    request bodies and server limits
    images.py   data-URL / local-file images with size limits
    metrics.py  Prometheus text metrics
    server.py   run_server (CLI) and BackgroundServer (tests, benchmarks)

FastAPI and uvicorn are the `serve` extra; importing this package does not need them.
"""

from edgelmm.serve.schemas import Limits
from edgelmm.serve.server import BackgroundServer, build, run_server

__all__ = ["BackgroundServer", "Limits", "build", "run_server"]
