"""Any OpenAI-compatible server as a backend: vLLM, LMDeploy's api_server, llama.cpp's server,
TensorRT-LLM, or `edgelmm serve`.

    load(ModelSpec(path="shapes-vlm-s", options={"base_url": "http://127.0.0.1:8000/v1"}), backend="openai")

`spec.path` is the model name the server knows. Requests go out as they came in: messages to
`/chat/completions` (images as data URLs where they are in the conversation), text and token
ids to `/completions` (token ids as a token-id prompt, never re-tokenized; images of a text
prompt in `images`, which only `edgelmm serve` reads). Generation is streamed, so TTFT and the
time of each token are measured here, on the client side: what a user of that server sees, the
network included. Prompt log-probabilities are asked for as the server's API allows:
`echo` + `logprobs` on completions (the OpenAI legacy form vLLM keeps), vLLM's `prompt_logprobs`
on chat; those requests are not streamed. Peak memory is the server's business and is None;
visual tokens are not reported by the API and count 0; prompt tokens are None when the server
sends no usage.

Token ids: the OpenAI API names tokens by their text. With `return_token_ids` (edgelmm serve
and vLLM) the server also sends the ids and names every log-probability's token by id
(`return_tokens_as_token_ids`), which top and prompt log-probabilities need here.

Every sampling setting is sent, including the ones the benchmark leaves at "off" (top_k 0,
min_p 0, repetition penalties 1), so that a server's own defaults (llama.cpp's server samples
with top_k 40, min_p 0.05 and, in older versions, a repeat penalty of 1.1) never decide the
answer; `explicit_sampling: false` sends only the OpenAI fields, for servers that refuse others.

Images: a server without the model's vision part may drop them and answer from the text alone
(llama.cpp's server given a GGUF without its mmproj does). The first request with images is
preceded by a check: the same prompt with and without its images must count different prompt
tokens (or the imageless one must be refused); a server that counts the same is an error that
says so, once, instead of a run of answers to questions about pictures nobody saw.

Connection failures, time-outs and 408/429/5xx answers before the first token are retried with
exponential back-off; other 4xx answers fail at once with the server's own message. A stream
that breaks after tokens have arrived is not retried (the tokens would be counted twice).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent, TokenScore
from edgelmm.backends.engines import engine_options, image_data_url, no_methods, openai_messages
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError

OPTIONS = {
    "base_url": None,  # required: the server's API root, e.g. http://127.0.0.1:8000/v1
    "api_key": None,  # else $OPENAI_API_KEY, else none
    "timeout_s": 120.0,  # per read; a first token slower than this counts as a failure
    "connect_timeout_s": 5.0,
    "retries": 3,
    "backoff_s": 0.5,  # first wait; doubles per retry
    "concurrency": 4,  # requests of one generate() call in flight at once
    "return_token_ids": False,  # ask for token ids (edgelmm serve, vLLM); other servers may refuse the fields
    "check_model": True,  # at load, check that GET /models lists the model
    "check_images": True,  # before the first request with images, check that the server reads them
    "explicit_sampling": True,  # also send top_k, min_p and repetition penalties set to off
}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _token_id(token: str) -> int | None:
    """A token named by id ('token_id:123', vLLM's return_tokens_as_token_ids), else None."""
    return int(token[9:]) if token.startswith("token_id:") and token[9:].isdigit() else None


# Samplers that are off in SamplingParams, by the names vLLM, llama.cpp's server and edgelmm serve read.
SAMPLERS_OFF = {"min_p": 0.0, "repetition_penalty": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0}


def request_body(model: str, request: Request, params: SamplingParams, token_ids: bool, stream: bool,
                 explicit: bool = True) -> tuple[str, dict[str, Any]]:
    """(route, body) for one request, with every sampling setting sent explicitly (a server's own
    defaults, such as a repeat penalty, must not decide the answer) unless `explicit` is False."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if explicit:
        body.update(SAMPLERS_OFF, top_k=params.top_k)
    elif params.top_k:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if token_ids:
        body.update(return_token_ids=True, return_tokens_as_token_ids=True)
    if request.messages is not None:
        body["messages"] = openai_messages(request)
        if params.wants_logprobs:
            body.update(logprobs=True, top_logprobs=params.top_logprobs)
        if params.prompt_logprobs is not None:
            body["prompt_logprobs"] = params.prompt_logprobs
        return "/chat/completions", body
    body["prompt"] = request.text if request.text is not None else request.token_ids
    if request.images:
        body["images"] = [image_data_url(i) for i in request.images]
    if params.wants_logprobs or params.prompt_logprobs is not None:
        body["logprobs"] = max(params.top_logprobs, params.prompt_logprobs or 0)
    if params.prompt_logprobs is not None:
        body["echo"] = True
    return "/completions", body


def server_message(response: Any) -> str:
    try:
        error = response.json().get("error", {})
        return error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:200]


DONE: Any = object()  # sse_chunk: the stream's closing `data: [DONE]`


def sse_chunk(line: str) -> Any:
    """One line of a server-sent event stream: its decoded JSON chunk, DONE at the stream's end,
    None for a line that carries no data (ValueError for data that is not JSON)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == "[DONE]" else json.loads(data)


def stream_error(chunk: dict[str, Any]) -> str:
    """The message of an error chunk sent mid-stream."""
    error = chunk["error"]
    return str(error.get("message", error) if isinstance(error, dict) else error)


class Answer:
    """What the chunks of one answer add up to (streamed chunks, or one whole response)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.text, self.finish, self.usage = "", "length", None
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.prompt_ids: list[int] | None = None
        self.prompt_scores: list[TokenScore] | None = None

    def entries(self, choice: dict[str, Any]) -> list[tuple[str, float | None, list[tuple[str, float]]]]:
        """(token, logprob, top) of a choice's log-probabilities, chat or completions form."""
        logprobs = choice.get("logprobs") or {}
        if "content" in logprobs:
            return [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
                    for e in logprobs["content"] or []]
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or [])
        return [(t, lp, list((top or {}).items())) for t, lp, top in
                zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], tops)]

    def add(self, choice: dict[str, Any], echo_tokens: int = 0) -> tuple[list[int], list[float], str]:
        """Take one choice (chunk); returns its new token ids, their logprobs and its new text."""
        self.finish = choice.get("finish_reason") or self.finish
        if "delta" in choice or "message" in choice:  # chat: a streamed chunk, or a whole answer
            text = (choice.get("delta") or choice.get("message") or {}).get("content")
        else:
            text = choice.get("text")
        text = text or ""
        entries = self.entries(choice)
        if self.prompt_ids is None and choice.get("prompt_token_ids"):
            self.prompt_ids = list(choice["prompt_token_ids"])
        if echo_tokens:  # completions echo: the first entries (and text) are the prompt's
            prompt, entries = entries[:echo_tokens], entries[echo_tokens:]
            self.prompt_scores = [TokenScore(self._id(t, None), lp, self._top(top)) for t, lp, top in prompt]
            offsets = (choice.get("logprobs") or {}).get("text_offset") or []
            text = text[offsets[echo_tokens]:] if len(offsets) > echo_tokens else ""
        ids = list(choice.get("token_ids") or [])
        new_logprobs = [lp for _, lp, _ in entries if lp is not None]
        if not ids and entries and all(_token_id(t) is not None for t, _, _ in entries):
            ids = [_token_id(t) for t, _, _ in entries]  # type: ignore[misc]
        self.ids += ids
        self.logprobs += new_logprobs
        if self.params.top_logprobs:
            self.tops += [self._top(top) for _, _, top in entries]
        self.text += text
        return ids, new_logprobs, text

    def add_chunk(self, chunk: dict[str, Any], stamps: list[float], now: float) -> list[tuple[list[int], list[float], str]]:
        """Take one streamed chunk that arrived at `now`: (ids, logprobs, text) of each choice that
        added tokens, one stamp per token appended to `stamps` (a chunk of n tokens is spread over
        the wait for it; without ids or logprobs a text piece counts as one token)."""
        self.usage = chunk.get("usage") or self.usage
        added = []
        for choice in chunk.get("choices", []):
            ids, logprobs, text = self.add(choice)
            n = len(ids) or len(logprobs) or (1 if text else 0)
            if n:
                last = stamps[-1] if stamps else now
                stamps += [last + (now - last) * (i + 1) / n for i in range(n)]
                added.append((ids, logprobs, text))
        return added

    def _id(self, token: str, fallback: int | None) -> int:
        found = _token_id(token)
        if found is None and fallback is None:
            raise EdgelmmError("the server named a token by its text, and log-probabilities here need token ids",
                               "load the openai backend with options: {return_token_ids: true} (edgelmm serve, vLLM)")
        return found if found is not None else fallback  # type: ignore[return-value]

    def _top(self, top: list[tuple[str, float]]) -> list[tuple[int, float]]:
        return [(self._id(t, None), lp) for t, lp in top]

    def result(self, stamps: list[float], t0: float, end: float) -> Result:
        usage = self.usage or {}
        generated = usage.get("completion_tokens", len(self.ids) or len(stamps))
        finish = "stop" if self.finish == "stop" else "length"
        return Result(
            text=self.text, token_ids=self.ids, logprobs=self.logprobs if self.params.wants_logprobs else None,
            timings=Timings.from_stamps(t0, stamps, end), counts=Counts(usage.get("prompt_tokens"), 0, generated),
            peak_memory_bytes=None, finish_reason=finish, top_logprobs=self.tops if self.params.top_logprobs else None,
            prompt_token_ids=self.prompt_ids, prompt_logprobs=self.prompt_scores,
        )


def _chat_prompt_scores(entries: Any, prompt_ids: list[int] | None) -> list[TokenScore] | None:
    """vLLM's chat `prompt_logprobs`: per prompt token None or {token id: {logprob, ...}}."""
    if entries is None:
        raise EdgelmmError("the server sent no prompt_logprobs for a chat request",
                           "ask a server that supports them (vLLM, edgelmm serve) or send the prompt to completions")
    scores = []
    for i, entry in enumerate(entries):
        token = prompt_ids[i] if prompt_ids else None
        if not entry:
            scores.append(TokenScore(token if token is not None else -1, None))
            continue
        pairs = sorted(((int(k), float(v["logprob"] if isinstance(v, dict) else v)) for k, v in entry.items()),
                       key=lambda p: -p[1])
        chosen = token if token is not None else pairs[0][0]
        logprob = next((lp for t, lp in pairs if t == chosen), None)
        scores.append(TokenScore(chosen, logprob, pairs))
    return scores


def whole_result(route: str, body: dict[str, Any], response: dict[str, Any], params: SamplingParams, t0: float,
                 end: float) -> Result:
    """The Result of a request that `request_body` built and the server answered whole (not streamed)."""
    answer = Answer(params)
    answer.usage = response.get("usage")
    [choice] = response.get("choices") or [{}]
    echo = int((answer.usage or {}).get("prompt_tokens") or len(choice.get("prompt_token_ids") or [])) if "echo" in body else 0
    answer.add(choice, echo_tokens=echo)
    if route == "/chat/completions" and params.prompt_logprobs is not None:
        answer.prompt_scores = _chat_prompt_scores(response.get("prompt_logprobs"), answer.prompt_ids)
    return answer.result([end] * len(answer.ids), t0, end)


class OpenAIBackend(Backend):
    name = "openai"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = None
        self.options: dict[str, Any] = {}
        self.model = ""
        self._images_checked = False
        self._probe_lock = threading.Lock()

    def load(self, spec: ModelSpec) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingExtraError("the openai backend", "openai", "httpx") from None
        no_methods(spec, self.name, "apply them on the server (edgelmm serve --method ...)")
        options = engine_options(spec, OPTIONS, self.name)
        if not options["base_url"]:
            raise EdgelmmError("the openai backend needs the server's address",
                               "pass --base-url http://HOST:PORT/v1, or options: {base_url: ...} in the model spec")
        key = options["api_key"] or os.environ.get("OPENAI_API_KEY")
        self.client = httpx.Client(
            base_url=str(options["base_url"]).rstrip("/"),
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(options["timeout_s"], connect=options["connect_timeout_s"]),
            limits=httpx.Limits(max_connections=max(int(options["concurrency"]), 1)),
        )
        self.spec, self.options, self.model = spec, options, spec.path
        if options["check_model"]:
            served = [m.get("id") for m in self._get("/models").get("data", [])]
            if self.model not in served:
                raise EdgelmmError(f"the server at {options['base_url']} does not serve '{self.model}'",
                                   f"it serves: {', '.join(map(str, served)) or 'nothing'}")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def device_name(self) -> str:
        return f"remote ({self.options.get('base_url')})"

    # ------------------------------------------------------------ HTTP with retries
    def _failure(self, attempt: int) -> bool:
        """Sleep before the next try; False when the tries are used up."""
        if attempt >= int(self.options["retries"]):
            return False
        time.sleep(float(self.options["backoff_s"]) * 2**attempt)
        return True

    def _get(self, path: str) -> dict[str, Any]:
        import httpx

        url = f"{self.options['base_url']}{path}"
        for attempt in range(int(self.options["retries"]) + 1):
            try:
                response = self.client.get(path)
            except httpx.TransportError as exc:
                if self._failure(attempt):
                    continue
                raise EdgelmmError(f"cannot reach {url}: {exc}", "is the server running, and is base_url right?") from None
            if response.status_code in RETRY_STATUS and self._failure(attempt):
                continue
            if response.status_code != 200:
                raise EdgelmmError(f"{url} answered {response.status_code}: {server_message(response)}")
            try:
                return response.json()
            except ValueError:
                raise EdgelmmError(f"{url} did not answer with JSON: is it an OpenAI-compatible server?") from None
        raise AssertionError("unreachable")

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        url = f"{self.options['base_url']}{route}"
        for attempt in range(int(self.options["retries"]) + 1):
            try:
                response = self.client.post(route, json=body)
            except httpx.TransportError as exc:
                if self._failure(attempt):
                    continue
                raise EdgelmmError(f"cannot reach {url} after {attempt + 1} tries: {type(exc).__name__}: {exc}",
                                   "is the server running and reachable?") from None
            if response.status_code in RETRY_STATUS and self._failure(attempt):
                continue
            if response.status_code != 200:
                raise EdgelmmError(f"{url} answered {response.status_code}: {server_message(response)}")
            return response.json()
        raise AssertionError("unreachable")

    def _events(self, route: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The decoded SSE chunks of one streamed request, retried until the first chunk arrives."""
        import httpx

        url = f"{self.options['base_url']}{route}"
        for attempt in range(int(self.options["retries"]) + 1):
            received = False
            try:
                with self.client.stream("POST", route, json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        if response.status_code in RETRY_STATUS and self._failure(attempt):
                            continue
                        raise EdgelmmError(f"{url} answered {response.status_code}: {server_message(response)}")
                    for line in response.iter_lines():
                        chunk = sse_chunk(line)
                        if chunk is DONE:
                            return
                        if chunk is None:
                            continue
                        if "error" in chunk:
                            raise EdgelmmError(f"{url} failed mid-stream: {stream_error(chunk)}")
                        received = True
                        yield chunk
                    return
            except httpx.TransportError as exc:
                if received:
                    raise EdgelmmError(f"the stream from {url} broke after tokens had arrived: {exc}") from None
                if self._failure(attempt):
                    continue
                raise EdgelmmError(f"cannot reach {url} after {attempt + 1} tries: {type(exc).__name__}: {exc}",
                                   "is the server running and reachable?") from None

    # ------------------------------------------------------------ does the server see images?
    def _prompt_tokens(self, request: Request) -> int | None:
        """Prompt tokens the server counts for `request`; None when it sends no usage."""
        route, body = request_body(self.model, request, SamplingParams(max_new_tokens=1), False, stream=False,
                                   explicit=self.options["explicit_sampling"])
        return (self._post(route, body).get("usage") or {}).get("prompt_tokens")

    def _check_images(self, request: Request) -> None:
        """Once, before the first request with images: the server must count them (see the module doc)."""
        if not self.options["check_images"] or self._images_checked or not request.all_images():
            return
        with self._probe_lock:
            if self._images_checked:
                return
            if request.messages is not None:
                pair = [Request.chat("Describe the image.", request.all_images()[:1]), Request.chat("Describe the image.")]
            elif request.text is not None:
                pair = [Request(text=request.text, images=request.images), Request(text=request.text)]
            else:
                pair = [Request(token_ids=request.token_ids, images=request.images), Request(token_ids=request.token_ids)]
            with_images = self._prompt_tokens(pair[0])
            try:
                without = self._prompt_tokens(pair[1])
            except EdgelmmError:
                without = None  # refused without its images: the server reads them
            if with_images is not None and with_images == without:
                raise EdgelmmError(
                    f"the server at {self.options['base_url']} ignores images: a prompt counts {with_images} tokens "
                    "with its image and without it, so it would answer questions about pictures it never saw",
                    "serve the model with its vision part (llama.cpp: --mmproj FILE), or set options: "
                    "{check_images: false} to send them anyway")
            self._images_checked = True

    # ------------------------------------------------------------ generation
    def _ids_needed(self, params: SamplingParams) -> bool:
        return bool(params.top_logprobs or params.prompt_logprobs is not None or self.options["return_token_ids"])

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        if self.client is None:
            raise EdgelmmError("the openai backend is not connected", "call load(spec) first")
        self._check_images(request)
        if params.prompt_logprobs is not None:  # scored answers come whole
            result = self._whole(request, params)
            yield TokenEvent(None, result.text, None, result.timings.e2e_s)
            yield TokenEvent(None, "", None, result.timings.e2e_s, result=result)
            return
        t0 = time.perf_counter()
        stamps: list[float] = []
        answer = Answer(params)
        route, body = request_body(self.model, request, params, self._ids_needed(params), stream=True,
                                   explicit=self.options["explicit_sampling"])
        for chunk in self._events(route, body):
            now = time.perf_counter()
            for ids, logprobs, text in answer.add_chunk(chunk, stamps, now):
                n = len(ids) or len(logprobs) or 1
                yield TokenEvent(ids[0] if len(ids) == 1 else None, text, logprobs[0] if len(logprobs) == 1 else None,
                                 now - t0, answer.tops[-1] if params.top_logprobs and n == 1 and answer.tops else None)
        end = time.perf_counter()
        yield TokenEvent(None, "", None, end - t0, result=answer.result(stamps, t0, end))

    def _whole(self, request: Request, params: SamplingParams) -> Result:
        """One request answered whole: how prompt log-probabilities come back."""
        t0 = time.perf_counter()
        route, body = request_body(self.model, request, params, True, stream=False, explicit=self.options["explicit_sampling"])
        response = self._post(route, body)
        return whole_result(route, body, response, params, t0, time.perf_counter())

    def _one(self, request: Request, params: SamplingParams) -> Result:
        for event in self.stream(request, params):
            if event.result is not None:
                return event.result
        raise EdgelmmError("the server's stream ended without a result")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """Requests in flight together (up to `concurrency`), results in the order given."""
        if requests:
            self._check_images(next((r for r in requests if r.all_images()), requests[0]))
        if len(requests) <= 1:
            return [self._one(r, params) for r in requests]
        with ThreadPoolExecutor(max_workers=min(int(self.options["concurrency"]), len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, params), requests))
