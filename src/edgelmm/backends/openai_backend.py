"""Any OpenAI-compatible server as a backend: vLLM, LMDeploy's api_server, llama.cpp's server,
TensorRT-LLM, or `edgelmm serve`.

    load(ModelSpec(path="shapes-vlm-s", options={"base_url": "http://127.0.0.1:8000/v1"}), backend="openai")

`spec.path` is the model name the server knows. Every request is streamed, so TTFT and the time
of each token are measured here, on the client side: what a user of that server sees, the
network included. Peak memory is the server's business and is left None; visual tokens are not
reported by the API and count 0. Connection failures, time-outs and 429/5xx answers before the
first token are retried with exponential back-off; other 4xx answers fail at once with the
server's own message. A stream that breaks after tokens have arrived is not retried (the
tokens would be counted twice).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent
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
    "return_token_ids": False,  # ask for token ids (edgelmm serve, vLLM); other servers may refuse the field
    "check_model": True,  # at load, check that GET /models lists the model
}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def engine_options(spec: ModelSpec, known: dict[str, Any], backend: str) -> dict[str, Any]:
    """spec.options over the backend's defaults; an unknown key is an error, not a silent no-op.

    Options may be grouped by backend name (`{openai: {base_url: ...}, llamacpp: {gguf: ...}}`),
    so that one model spec serves a benchmark matrix over several engines: each backend reads its
    own group and skips the others'.
    """
    from edgelmm.backends.registry import BACKENDS

    own = spec.options.get(backend)
    given = own if isinstance(own, dict) else {k: v for k, v in spec.options.items() if k not in BACKENDS}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise EdgelmmError(f"unknown option(s) {', '.join(unknown)} for the {backend} backend",
                           f"known options: {', '.join(sorted(known))}")
    return {**known, **given}


def cuda_engine_profile(spec: ModelSpec, known: dict[str, Any], backend: str, own_options: str) -> Any:
    """Checks shared by the CUDA-only engines (vLLM, LMDeploy), then their hardware profile:
    they cannot take edgelmm's methods and need a GPU; `own_options` names what to use instead."""
    import torch

    from edgelmm.hardware import guess_profile, load_profile

    if any(m.strip() != "none" for m in spec.methods):
        raise EdgelmmError(f"the {backend} backend cannot apply edgelmm methods to its model",
                           f"use {own_options} or the torch backend")
    if not torch.cuda.is_available():
        raise EdgelmmError(f"the {backend} backend needs a CUDA GPU", "use the torch or llamacpp backend on this machine")
    hardware = engine_options(spec, known, backend)["hardware"]
    return load_profile(hardware) if hardware else guess_profile("cuda")


def image_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str, request: Request, params: SamplingParams, return_token_ids: bool) -> dict[str, Any]:
    """The /chat/completions body for one request: images first, then the text, as our adapters do."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in request.images]
    content.append({"type": "text", "text": request.prompt})
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": content if request.images else request.prompt}],
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if params.top_k:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = params.stop
    if params.logprobs:
        body["logprobs"] = True
    if return_token_ids:
        body["return_token_ids"] = True
    return body


def _server_message(response: Any) -> str:
    try:
        error = response.json().get("error", {})
        return error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:200]


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = None
        self.options: dict[str, Any] = {}
        self.model = ""

    def load(self, spec: ModelSpec) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingExtraError("the openai backend", "openai", "httpx") from None
        options = engine_options(spec, OPTIONS, self.name)
        if not options["base_url"]:
            raise EdgelmmError("the openai backend needs the server's address",
                               "set options: {base_url: http://HOST:PORT/v1} in the model spec")
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
    def _failure(self, what: str, attempt: int) -> bool:
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
                if self._failure(url, attempt):
                    continue
                raise EdgelmmError(f"cannot reach {url}: {exc}", "is the server running, and is base_url right?") from None
            if response.status_code in RETRY_STATUS and self._failure(url, attempt):
                continue
            if response.status_code != 200:
                raise EdgelmmError(f"{url} answered {response.status_code}: {_server_message(response)}")
            return response.json()
        raise AssertionError("unreachable")

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The decoded SSE chunks of one streamed request, retried until the first chunk arrives."""
        import httpx

        url = f"{self.options['base_url']}/chat/completions"
        for attempt in range(int(self.options["retries"]) + 1):
            received = False
            try:
                with self.client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        if response.status_code in RETRY_STATUS and self._failure(url, attempt):
                            continue
                        raise EdgelmmError(f"{url} answered {response.status_code}: {_server_message(response)}")
                    for line in response.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = chunk["error"]
                            message = error.get("message", error) if isinstance(error, dict) else error
                            raise EdgelmmError(f"{url} failed mid-stream: {message}")
                        received = True
                        yield chunk
                    return
            except httpx.TransportError as exc:
                if received:
                    raise EdgelmmError(f"the stream from {url} broke after tokens had arrived: {exc}") from None
                if self._failure(url, attempt):
                    continue
                raise EdgelmmError(f"cannot reach {url} after {attempt + 1} tries: {type(exc).__name__}: {exc}",
                                   "is the server running and reachable?") from None

    # ------------------------------------------------------------ generation
    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        if self.client is None:
            raise EdgelmmError("the openai backend is not connected", "call load(spec) first")
        t0 = time.perf_counter()
        stamps: list[float] = []
        ids: list[int] = []
        logprobs: list[float] = []
        text, finish, usage = "", "length", None
        for chunk in self._events(chat_body(self.model, request, params, self.options["return_token_ids"])):
            now = time.perf_counter()
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                delta = (choice.get("delta") or {}).get("content") or ""
                chunk_ids = choice.get("token_ids") or []
                chunk_logprobs = [e["logprob"] for e in ((choice.get("logprobs") or {}).get("content") or [])]
                # tokens in this chunk: exact where the server says (ids, logprobs), else one per text piece
                if "token_ids" in choice:
                    n = len(chunk_ids)
                elif params.logprobs:
                    n = len(chunk_logprobs)
                else:
                    n = 1 if delta else 0
                if n == 0 and not delta:
                    continue
                last = stamps[-1] if stamps else now  # a chunk of n tokens: spread over the wait for it
                stamps += [last + (now - last) * (i + 1) / n for i in range(n)]
                ids += chunk_ids
                logprobs += chunk_logprobs
                text += delta
                yield TokenEvent(chunk_ids[0] if len(chunk_ids) == 1 else None, delta,
                                 chunk_logprobs[0] if len(chunk_logprobs) == 1 else None, now - t0)
        end = time.perf_counter()
        generated = (usage or {}).get("completion_tokens", len(stamps))
        result = Result(
            text=text, token_ids=ids, logprobs=logprobs if params.logprobs else None,
            timings=Timings.from_stamps(t0, stamps, end),
            counts=Counts((usage or {}).get("prompt_tokens", 0), 0, generated),
            peak_memory_bytes=None, finish_reason="stop" if finish == "stop" else "length",
        )
        yield TokenEvent(None, "", None, end - t0, result=result)

    def _one(self, request: Request, params: SamplingParams) -> Result:
        for event in self.stream(request, params):
            if event.result is not None:
                return event.result
        raise EdgelmmError("the server's stream ended without a result")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """Requests in flight together (up to `concurrency`), results in the order given."""
        if len(requests) <= 1:
            return [self._one(r, params) for r in requests]
        with ThreadPoolExecutor(max_workers=min(int(self.options["concurrency"]), len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, params), requests))
