"""The OpenAI-compatible HTTP API over an Engine: routes, auth, limits, SSE and errors.

Every error leaves as an OpenAI error object (`{"error": {"message", "type", "param", "code"}}`)
with a 4xx status when the client can fix it, so the official clients raise their usual
exceptions; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgelmm.config import SamplingParams
from edgelmm.serve.engine import (
    ApiError,
    Completion,
    Engine,
    Prompt,
    Stream,
    StreamItem,
    log,
)
from edgelmm.serve.images import load_image
from edgelmm.serve.metrics import Metrics
from edgelmm.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    Message,
)
from edgelmm.serve.text import TokenScore

B = TypeVar("B", bound=BaseModel)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    allow_local_files: bool = False
    limits: Limits = field(default_factory=Limits)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---------------------------------------------------------------- request parsing


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"request body larger than {limit // 2**20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body larger than {limit // 2**20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _validate(schema: type[B], data: dict[str, Any]) -> B:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}" if where else message, param=where or None) from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (which frees its engine slot) if the client disconnects first."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientGone
    finally:
        task.cancel()
        watch.cancel()


# ---------------------------------------------------------------- answer building


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_usage(c: Completion) -> dict[str, int]:
    if c.result is None:
        return _usage(len(c.prompt_ids or []), 0)
    return _usage(c.result.counts.prompt_tokens, c.result.counts.generated_tokens)


def _chat_logprobs(scores: list[TokenScore]) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [
        {**entry(s.text, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores
    ]}


def _completion_logprobs(scores: list[TokenScore], offset: int = 0) -> dict[str, Any]:
    offsets, position = [], offset
    for s in scores:
        offsets.append(position)
        position += len(s.text)
    tops = [dict(s.top) if s.logprob is not None else None for s in scores]
    return {"tokens": [s.text for s in scores], "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": tops if any(s.top for s in scores) else None, "text_offset": offsets}


# ---------------------------------------------------------------- the app


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app; the caller owns the engine (and closes it after the server stops)."""
    app = FastAPI(title="edgelmm", docs_url=None, redoc_url=None, openapi_url=None)
    limits = config.limits
    metrics = Metrics(queued=lambda: engine.queued, running=lambda: engine.running)
    created = int(time.time())

    def error_response(error: ApiError) -> JSONResponse:
        metrics.errors.inc(1, error.type)
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"
        metrics.requests.inc(1, route, str(response.status_code))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal server error ({type(exc).__name__}); the server keeps serving",
                                       "server_error"))

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        metrics.errors.inc(1, "client_disconnected")
        return Response(status_code=499)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{config.model_name}'",
                           code="model_not_found", param="model")

    def sampling(body: Any, max_tokens: int, logprobs: bool) -> SamplingParams:
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}, this server allows at most {limits.max_tokens}", param="max_tokens")
        return SamplingParams(max_new_tokens=max(max_tokens, 1), temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, logprobs=logprobs, stop=body.stops)

    async def images(urls: list[str]) -> list[Any]:
        if len(urls) > limits.max_images:
            raise ApiError(400, f"{len(urls)} images in one request, at most {limits.max_images} allowed", param="image_url")
        return [await asyncio.to_thread(load_image, url, limits, config.allow_local_files) for url in urls]

    async def chat_prompt(messages: list[Message]) -> Prompt:
        """OpenAI messages -> HF chat messages with image placeholders, and the decoded images."""
        converted, urls = [], []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                converted.append({"role": role, "content": message.content})
                continue
            parts = []
            for part in message.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    urls.append(part.image_url.url)
                    parts.append({"type": "image"})
            converted.append({"role": role, "content": parts})
        return Prompt(await images(urls), messages=converted)

    def observe(started: float, c: Completion | None, ttft_s: float | None) -> None:
        if c is not None:
            usage = _completion_usage(c)
            metrics.prompt_tokens.inc(usage["prompt_tokens"])
            metrics.generation_tokens.inc(usage["completion_tokens"])
        if ttft_s is not None:
            metrics.ttft.observe(ttft_s)
        metrics.latency.observe(time.perf_counter() - started)

    async def respond_stream(request: Request, source: Stream | Completion, started: float, chunk: Any,
                             usage_chunk: Any, include_usage: bool, opening: dict[str, Any] | None = None) -> StreamingResponse:
        """SSE from a live Stream (its first item awaited first, so errors keep their status) or a
        finished Completion (sent as one piece)."""
        first: StreamItem | None = None
        if isinstance(source, Stream):
            try:
                first = await _unless_gone(request, source.__anext__())
            except BaseException:
                source.cancel()
                raise
        watch = asyncio.ensure_future(_until_disconnect(request))
        watch.add_done_callback(lambda _: source.cancel() if isinstance(source, Stream) else None)

        async def body() -> AsyncIterator[str]:
            ttft = None
            try:
                if opening is not None:
                    yield _sse(opening)
                if isinstance(source, Completion):  # the buffered path: the whole answer as one piece
                    ttft = time.perf_counter() - started
                    yield _sse(chunk(text=source.result.text, scores=source.scores, ids=source.result.token_ids))
                    completion = source
                else:
                    item = first
                    async for item in _chain(first, source):
                        event = item.event
                        if event.result is not None:
                            break
                        if ttft is None and event.token_id is not None:
                            ttft = time.perf_counter() - started
                        score = [TokenScore(event.token_id, item.token_text, event.logprob)] if event.logprob is not None else None
                        ids = [event.token_id] if event.token_id is not None else []
                        yield _sse(chunk(text=event.text, scores=score, ids=ids))
                    completion = Completion(item.event.result)
                yield _sse(chunk(finish=completion.result.finish_reason))
                if include_usage:
                    yield _sse(usage_chunk(_completion_usage(completion)))
                yield _sse("[DONE]")
                observe(started, completion, ttft)
            except ApiError as error:
                metrics.errors.inc(1, error.type)
                yield _sse(error.body())
                yield _sse("[DONE]")
            finally:
                watch.cancel()
                if isinstance(source, Stream):
                    source.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "waiting": engine.queued, "running": engine.running}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "edgelmm",
                "max_model_len": engine.max_context}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = _validate(ChatCompletionRequest, await _json_body(request, limits.max_body_bytes))
        check_model(body.model)
        explicit = body.requested_max_tokens is not None
        params = sampling(body, body.requested_max_tokens or limits.max_tokens, body.logprobs)
        prompt = await chat_prompt(body.messages)
        top = body.top_logprobs or 0
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": config.model_name}

        if body.stream:
            def chunk(role: bool = False, text: str | None = None, scores: list[TokenScore] | None = None,
                      ids: list[int] | None = None, finish: str | None = None) -> dict[str, Any]:
                if role:
                    delta: dict[str, Any] = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": text} if text is not None else {}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                          "logprobs": _chat_logprobs(scores) if scores and body.logprobs else None}
                if body.return_token_ids and ids is not None:
                    choice["token_ids"] = ids
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
                return {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}

            if top:  # alternatives come from a scoring pass after generation: sent as one piece
                source: Stream | Completion = await _unless_gone(request, engine.complete(prompt, params, explicit, top=top))
            else:
                source = engine.open_stream(prompt, params, explicit)
            return await respond_stream(request, source, started, chunk, usage_chunk, body.include_usage, chunk(role=True))

        c = await _unless_gone(request, engine.complete(prompt, params, explicit, top=top))
        result = c.result
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason,
            "logprobs": _chat_logprobs(c.scores) if body.logprobs and c.scores is not None else None,
        }
        if body.return_token_ids:
            choice["token_ids"] = result.token_ids
        observe(started, c, c.queued_s + result.timings.ttft_s)
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": _completion_usage(c)})

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        started = time.perf_counter()
        body = _validate(CompletionRequest, await _json_body(request, limits.max_body_bytes))
        check_model(body.model)
        logprobs = body.logprobs is not None
        params = sampling(body, body.max_tokens, logprobs)
        prompt = Prompt(await images(body.images), text=body.prompt)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": config.model_name}
        top, scored = body.logprobs or 0, body.echo

        def chunk(text: str | None = None, scores: list[TokenScore] | None = None,
                  ids: list[int] | None = None, finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "text": text or "", "finish_reason": finish,
                                      "logprobs": _completion_logprobs(scores) if scores and logprobs else None}
            if body.return_token_ids and ids is not None:
                choice["token_ids"] = ids
            return {**head, "object": "text_completion", "choices": [choice]}

        if body.stream:
            def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
                return {**head, "object": "text_completion", "choices": [], "usage": usage}

            if top or scored:
                source: Stream | Completion = await _unless_gone(
                    request, engine.complete(prompt, params, True, top=top, echo=scored))
                if scored:  # echo streams the prompt first, as OpenAI's API does
                    source.result.text = source.prompt_text + source.result.text
                    source.scores = (source.prompt_scores or []) + (source.scores or [])
            else:
                source = engine.open_stream(prompt, params, True)

            return await respond_stream(request, source, started, chunk, usage_chunk, body.include_usage)

        c = await _unless_gone(request, engine.complete(prompt, params, True, top=top, echo=scored, generate=body.max_tokens > 0))
        text = c.result.text if c.result else ""
        scores = c.scores or []
        if scored:
            text = c.prompt_text + text
            scores = c.prompt_scores + scores
        choice = {"index": 0, "text": text, "finish_reason": c.result.finish_reason if c.result else "length",
                  "logprobs": _completion_logprobs(scores) if logprobs else None}
        if body.return_token_ids:
            choice["token_ids"] = c.result.token_ids if c.result else []
            choice["prompt_token_ids"] = c.prompt_ids
        observe(started, c, c.queued_s + c.result.timings.ttft_s if c.result else None)
        return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": _completion_usage(c)})

    return app


async def _chain(first: StreamItem | None, rest: Stream) -> AsyncIterator[StreamItem]:
    if first is not None:
        yield first
        if first.event.result is not None:
            return
    async for item in rest:
        yield item
