"""The OpenAI-compatible HTTP API over an Engine: routes, auth, limits, SSE and errors.

Routes are module-level functions over the app's state (`request.app.state.server`, one
`ServerState`). Every error leaves as an OpenAI error object with a 4xx status when the client
can fix it (see `errors`), so the official clients raise their usual exceptions; nothing a
client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edgelmm.backends.base import Result, TokenScore
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request
from edgelmm.serve.engine import Completion, Engine, Stream, StreamItem
from edgelmm.serve.errors import ApiError, log
from edgelmm.serve.images import load_image
from edgelmm.serve.metrics import Metrics, prefix_cache_metrics
from edgelmm.serve.responses import (
    Names,
    chat_logprobs,
    completion_logprobs,
    generated_scores,
    result_usage,
    vllm_prompt_logprobs,
)
from edgelmm.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    Message,
    TokenizeRequest,
    VerifyRequest,
    _Sampling,
)
from edgelmm.serve.sessions import PROTOCOL, VERSION, Round, VerifySessions

B = TypeVar("B", bound=BaseModel)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
          "/tokenizer_info", "/v1/edgelmm/verify")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    local_media_dir: Path | None = None  # local image files are read from here only
    limits: Limits = field(default_factory=Limits)


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    sessions: VerifySessions | None = None  # the native verify protocol, where the backend keeps KV states


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _state(request: HttpRequest) -> ServerState:
    return request.app.state.server


# ---------------------------------------------------------------- request parsing


async def _json_body(request: HttpRequest, limits: Limits) -> dict[str, Any]:
    """The body as a JSON object: JSON only, at most max_body_bytes, and no chunk slower than
    body_timeout_s; a client that hangs up while sending is a client error, not ours."""
    limit = limits.max_body_bytes
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # also keeps a web page's form posts away from a local server
        raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got '{kind or 'none'}'")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"request body larger than {limit // 2**20} MiB")
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), limits.body_timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body stalled: nothing arrived for {limits.body_timeout_s:g} s") from None
        except ClientDisconnect:
            raise _ClientGone from None
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


async def _read(request: HttpRequest, schema: type[B]) -> B:
    """The request's body, checked against its schema and, where it names one, the served model."""
    state = _state(request)
    body = _validate(schema, await _json_body(request, state.config.limits))
    model = getattr(body, "model", None)
    if model is not None:
        _check_model(state, model)
    return body


def _validate(schema: type[B], data: dict[str, Any]) -> B:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}" if where else message, param=where or None) from None


async def _until_disconnect(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: HttpRequest, work: Awaitable[Any]) -> Any:
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


def _check_model(state: ServerState, name: str) -> None:
    if name != state.config.model_name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{state.config.model_name}'",
                       code="model_not_found", param="model")


def _sampling(state: ServerState, body: _Sampling, max_tokens: int, logprobs: bool, top: int,
              prompt_logprobs: int | None) -> SamplingParams:
    limit = state.config.limits.max_tokens
    if max_tokens > limit:
        raise ApiError(400, f"max_tokens is {max_tokens}, this server allows at most {limit}", param="max_tokens")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), seed=body.seed, logprobs=logprobs, top_logprobs=top,
                              prompt_logprobs=prompt_logprobs, stop=body.stops)
    except ValidationError as exc:
        raise ApiError(400, exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


async def _images(state: ServerState, urls: list[str]) -> list[Any]:
    limits = state.config.limits
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images in one request, at most {limits.max_images} allowed", param="image_url")
    return [await asyncio.to_thread(load_image, url, limits, state.config.local_media_dir) for url in urls]


async def _chat_request(state: ServerState, messages: list[Message]) -> Request:
    """OpenAI messages -> a Request with the images decoded where they are in the conversation."""
    urls = [p.image_url.url for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url"]
    images = iter(await _images(state, urls))
    converted = []
    for message in messages:
        content: Any = message.content
        if isinstance(content, list):
            content = [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image", "image": next(images)}
                       for p in content]
        converted.append({"role": message.role, "content": content})
    return _request(messages=converted)


def _request(**kwargs: Any) -> Request:
    try:
        return Request(**kwargs)
    except EdgelmmError as exc:
        raise ApiError(400, str(exc)) from None


def _prompt_request(prompt: str | list[int], images: list[Any]) -> Request:
    """A raw prompt (text, or token ids used as given) with the images it holds."""
    return _request(text=prompt, images=images) if isinstance(prompt, str) else _request(token_ids=prompt, images=images)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _observe(state: ServerState, started: float, results: list[Result], ttft_s: float | None) -> None:
    metrics = state.metrics
    for result in results:
        metrics.prompt_tokens.inc(result.counts.prompt_tokens or 0)
        metrics.generation_tokens.inc(result.counts.generated_tokens)
    if ttft_s is not None:
        metrics.ttft.observe(ttft_s)
    metrics.latency.observe(time.perf_counter() - started)


def _event_stream(request: HttpRequest, state: ServerState, produce: Callable[[], AsyncIterator[str]],
                  streams: list[Stream]) -> StreamingResponse:
    """SSE from `produce`, which yields the response's events; a client that goes away cancels
    the open streams, and an error mid-stream is sent as an error event."""
    watch = asyncio.ensure_future(_until_disconnect(request))
    watch.add_done_callback(lambda _: [s.cancel() for s in streams])

    async def body() -> AsyncIterator[str]:
        try:
            async for event in produce():
                yield event
        except ApiError as error:
            state.metrics.errors.inc(1, error.type)
            yield _sse(error.body())
        finally:
            watch.cancel()
            for s in streams:
                s.cancel()
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(request: HttpRequest, stream: Stream) -> StreamItem:
    """A stream's first item, awaited before the response starts, so that errors keep their status."""
    try:
        return await _unless_gone(request, stream.__anext__())
    except BaseException:
        stream.cancel()
        raise


async def _items(first: StreamItem, rest: Stream) -> AsyncIterator[StreamItem]:
    yield first
    if first.event.result is None:
        async for item in rest:
            yield item


# ---------------------------------------------------------------- routes


async def health(request: HttpRequest) -> dict[str, Any]:
    state = _state(request)
    return {"status": "ok", "model": state.config.model_name, **state.engine.status()}


async def prometheus(request: HttpRequest) -> PlainTextResponse:
    return PlainTextResponse(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "edgelmm",
            "max_model_len": state.engine.max_context}


async def list_models(request: HttpRequest) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


async def get_model(request: HttpRequest, name: str) -> dict[str, Any]:
    state = _state(request)
    _check_model(state, name)
    return _model_card(state)


async def chat_completions(request: HttpRequest) -> Response:
    state = _state(request)
    started = time.perf_counter()
    body = await _read(request, ChatCompletionRequest)
    explicit = body.requested_max_tokens is not None
    params = _sampling(state, body, body.requested_max_tokens or state.config.limits.max_tokens, body.logprobs,
                       body.top_logprobs or 0, body.prompt_logprobs)
    chat = await _chat_request(state, body.messages)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.config.model_name}

    def choice_ids(choice: dict[str, Any], result: Result | None, ids: list[int] | None) -> dict[str, Any]:
        if body.return_token_ids:
            if ids is not None:
                choice["token_ids"] = ids
            if result is not None:
                choice["prompt_token_ids"] = result.prompt_token_ids
        return choice

    if not body.stream:
        done: Completion = await _unless_gone(request, state.engine.complete(chat, params, explicit))
        result, names = done.result, Names(done.texts, body.return_tokens_as_token_ids)
        choice = {
            "index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason,
            "stop_reason": result.stop_reason,
            "logprobs": chat_logprobs(result.token_ids, result.logprobs, result.top_logprobs, names)
            if body.logprobs and result.logprobs is not None else None,
        }
        answer = {**head, "object": "chat.completion", "choices": [choice_ids(choice, result, result.token_ids)],
                  "usage": result_usage([result])}
        if result.prompt_logprobs is not None:
            answer["prompt_logprobs"] = vllm_prompt_logprobs(result.prompt_logprobs, names)
        if done.extension is not None:
            answer["edgelmm"] = done.extension
        _observe(state, started, [result], done.queued_s + result.timings.ttft_s)
        return JSONResponse(answer)

    stream = state.engine.open_stream(chat, params, explicit)
    first = await _first(request, stream)

    def chunk(delta: dict[str, Any], extension: dict[str, Any] | None = None, **fields: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **fields}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        return _sse(data if extension is None else {**data, "edgelmm": extension})

    async def produce() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        ttft = None
        async for item in _items(first, stream):
            event = item.event
            if event.result is not None:
                result = event.result
                yield chunk({}, item.extension, **choice_ids({"finish_reason": result.finish_reason,
                                                             "stop_reason": result.stop_reason}, result, None))
                if body.include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": result_usage([result])})
                _observe(state, started, [result], ttft)
                return
            if event.token_id is None and not event.text:
                continue
            if ttft is None and event.token_id is not None:
                ttft = time.perf_counter() - started
            fields: dict[str, Any] = {}
            if body.logprobs and event.token_id is not None and event.logprob is not None:
                names = Names(item.texts, body.return_tokens_as_token_ids)
                fields["logprobs"] = chat_logprobs([event.token_id], [event.logprob], [event.top or []], names)
            yield chunk({"content": event.text}, **choice_ids(fields, None, [] if event.token_id is None else [event.token_id]))

    return _event_stream(request, state, produce, [stream])


async def completions(request: HttpRequest) -> Response:
    state = _state(request)
    limits = state.config.limits
    started = time.perf_counter()
    body = await _read(request, CompletionRequest)
    prompts = body.prompts
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts in one request, at most {limits.max_prompts} allowed", param="prompt")
    scored = body.echo and body.logprobs is not None
    prompt_logprobs = (body.logprobs or 0) if body.echo else None  # echo shows the prompt as the model read it
    params = _sampling(state, body, body.max_tokens, body.logprobs is not None, body.logprobs or 0, prompt_logprobs)
    images = await _images(state, body.images) if body.images else []
    requests = [_prompt_request(p, images) for p in prompts]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.config.model_name}

    def choice(index: int, done: Completion | None, prompt: str | list[int], text: str = "",
               scores: list[TokenScore] | None = None, ids: list[int] | None = None, finish: str | None = None,
               texts: dict[int, str] | None = None) -> dict[str, Any]:
        """One choice or chunk choice; for a finished answer (`done`) everything comes from its result."""
        names = Names(done.texts if done else (texts or {}), body.return_tokens_as_token_ids)
        out: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if done is not None:
            result = done.result
            out.update(text=result.text, finish_reason=result.finish_reason, stop_reason=result.stop_reason)
            scores = generated_scores(result) if params.wants_logprobs else None
            ids = result.token_ids
            if body.echo:
                echoed = prompt if isinstance(prompt, str) else "".join(names.text(t) for t in result.prompt_token_ids or [])
                out["text"] = echoed + result.text
                if scored:
                    scores = (result.prompt_logprobs or []) + (scores or [])
        if scores is not None:
            out["logprobs"] = completion_logprobs(scores, names)
        if body.return_token_ids:
            out["token_ids"] = ids or []
            if done is not None:
                out["prompt_token_ids"] = done.result.prompt_token_ids
        return out

    if not body.stream or body.echo:  # echo needs the prompt's scores first: answered whole
        done_all: list[Completion] = await _unless_gone(
            request, asyncio.gather(*(state.engine.complete(r, params) for r in requests)))
        choices = [choice(i, d, p) for i, (d, p) in enumerate(zip(done_all, prompts))]
        results = [d.result for d in done_all]
        _observe(state, started, results, min(d.queued_s + d.result.timings.ttft_s for d in done_all))
        if not body.stream:
            answer = {**head, "object": "text_completion", "choices": choices, "usage": result_usage(results)}
            if any(d.extension is not None for d in done_all):
                answer["edgelmm"] = [d.extension for d in done_all]  # one per choice
            return JSONResponse(answer)

        async def replay() -> AsyncIterator[str]:
            for c in choices:
                yield _sse({**head, "object": "text_completion", "choices": [c]})
            if body.include_usage:
                yield _sse({**head, "object": "text_completion", "choices": [], "usage": result_usage(results)})

        return _event_stream(request, state, replay, [])

    streams = [state.engine.open_stream(r, params) for r in requests]  # queued together, answered in turn
    first = await _first(request, streams[0])

    async def produce() -> AsyncIterator[str]:
        results, ttft = [], None
        for index, stream in enumerate(streams):
            offset = 0
            items = _items(first, stream) if index == 0 else _items(await stream.__anext__(), stream)
            async for item in items:
                event = item.event
                if event.result is not None:
                    results.append(event.result)
                    done = {"index": index, "text": "", "logprobs": None, "finish_reason": event.result.finish_reason,
                            "stop_reason": event.result.stop_reason}
                    if body.return_token_ids:
                        done.update(token_ids=[], prompt_token_ids=event.result.prompt_token_ids)
                    yield _sse({**head, "object": "text_completion", "choices": [done]})
                    break
                if event.token_id is None and not event.text:
                    continue
                if ttft is None and event.token_id is not None:
                    ttft = time.perf_counter() - started
                scores = None
                if params.wants_logprobs and event.token_id is not None and event.logprob is not None:
                    scores = [TokenScore(event.token_id, event.logprob, event.top or [])]
                c = choice(index, None, prompts[index], event.text, scores,
                           [] if event.token_id is None else [event.token_id], texts=item.texts)
                if c["logprobs"] is not None:
                    c["logprobs"]["text_offset"] = [offset]
                offset += len(event.text)
                yield _sse({**head, "object": "text_completion", "choices": [c]})
        if body.include_usage:
            yield _sse({**head, "object": "text_completion", "choices": [], "usage": result_usage(results)})
        _observe(state, started, results, ttft)

    return _event_stream(request, state, produce, streams)


async def tokenize(request: HttpRequest) -> dict[str, Any]:
    """vLLM's /tokenize (lm-evaluation-harness tokenizes through it when no tokenizer is given)."""
    state = _state(request)
    body = await _read(request, TokenizeRequest)
    backend = state.engine.backend
    if body.messages is not None:
        chat = await _chat_request(state, body.messages)
        ids = await state.engine.call(lambda: backend.prompt_token_ids(chat))
    else:
        text = body.prompt
        ids = await state.engine.call(lambda: backend.tokenize(text, body.add_special_tokens))
    return {"count": len(ids), "max_model_len": state.engine.max_context, "tokens": ids}


async def verify(request: HttpRequest) -> dict[str, Any]:
    """The native draft-verify protocol (serve/sessions.py)."""
    state = _state(request)
    body = await _read(request, VerifyRequest)
    if body.model is not None:
        _check_model(state, body.model)
    sessions = state.sessions
    if body.probe:
        return {"protocol": PROTOCOL, "version": VERSION, "available": sessions is not None, "top_logprobs_max": 20,
                "batch_max": state.config.limits.max_batch_size}
    if sessions is None:
        raise ApiError(501, f"the {state.engine.backend.name} backend keeps no KV state for verify sessions",
                       code="verify_unsupported")
    assert body.session is not None
    if body.close:
        return {"session": body.session, "closed": await state.engine.call(lambda: sessions.close(body.session))}
    opening: Request | None = None
    if body.messages is not None:
        opening = await _chat_request(state, body.messages)
    elif body.prompt is not None:
        images = await _images(state, body.images) if body.images else []
        opening = _prompt_request(body.prompt, images)
    job = Round(body.session, opening, body.keep, body.tokens, body.top_logprobs)
    return await _unless_gone(request, state.engine.call_grouped("verify", sessions.run, job))


async def detokenize(request: HttpRequest) -> dict[str, Any]:
    state = _state(request)
    body = await _read(request, DetokenizeRequest)
    backend = state.engine.backend
    return {"prompt": await state.engine.call(lambda: backend.detokenize(body.tokens))}


async def tokenizer_info(request: HttpRequest) -> dict[str, Any]:
    state = _state(request)
    backend = state.engine.backend
    return await state.engine.call(backend.tokenizer_info)


# ---------------------------------------------------------------- the app


class _CountRequests:
    """Counts each HTTP response by route and status as it starts. A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware runs every request through a task group and a wrapped
    receive, which costs more than the model's part of a small verify round."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(1, route, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting)


def _error_response(request: HttpRequest, error: ApiError) -> JSONResponse:
    _state(request).metrics.errors.inc(1, error.type)
    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error_response(request, exc)


async def _http_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(request, ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind))


async def _server_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error_response(request, ApiError(500, f"internal server error ({type(exc).__name__}); the server keeps serving",
                                             "server_error"))


async def _client_gone(request: HttpRequest, exc: Exception) -> Response:
    _state(request).metrics.errors.inc(1, "client_disconnected")
    return Response(status_code=499)


async def authorize(request: HttpRequest) -> None:  # async: a plain def would run in a worker thread per request
    key = _state(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                       "authentication_error", code="invalid_api_key")


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app; the caller owns the engine (and closes it after the server stops)."""
    app = FastAPI(title="edgelmm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, config, Metrics(queued=lambda: engine.queued, running=lambda: engine.running))
    app.add_middleware(_CountRequests, metrics=app.state.server.metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(_ClientGone, _client_gone)
    app.add_exception_handler(Exception, _server_error)
    keyed = [Depends(authorize)]
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/tokenize", tokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/detokenize", detokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/edgelmm/verify", verify, methods=["POST"], dependencies=keyed)
    prefix = getattr(engine.backend, "prefix_cache", None)
    if prefix is not None:
        app.state.server.metrics.extra.extend(prefix_cache_metrics(prefix))
    if hasattr(engine.backend, "kv_runner") and hasattr(engine, "call_grouped"):
        limits = config.limits
        sessions = VerifySessions(engine.backend, limits.verify_cache_bytes, limits.max_verify_sessions)
        app.state.server.sessions = sessions
        app.state.server.metrics.extra.extend(sessions.parts)
    return app
