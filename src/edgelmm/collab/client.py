"""The edge's one way to the cloud: an async httpx client with retries, a time bound and a breaker.

The cloud is any OpenAI-compatible server (`edgelmm serve`, vLLM, vLLM behind its router);
nothing edgelmm-specific is asked of it. Requests go out as the openai backend builds them
(`openai_backend.request_body`: chat to /chat/completions with images as data URLs, text
prompts to /completions) and are answered whole, or streamed (`stream`, server-sent events).

- One `httpx.AsyncClient` per cloud: a connection pool (keep-alive) shared by every request.
- Every call is bounded by `timeout_s` in all, retries included: connection errors, time-outs
  and 408/429/5xx answers are retried with exponential back-off while time is left; other 4xx
  answers fail at once (the cloud refused this request; another try would be refused too).
- A circuit breaker: after `breaker_failures` failed calls in a row it opens and calls fail at
  once (no waiting on a dead cloud); after `breaker_reset_s` one caller probes the cloud with a
  cheap `GET /models` (half-open) and closes it again when that answers.
- Each call is logged as one JSON line on the `edgelmm.collab` logger (event, ok, reason,
  tries, seconds, error).
- Faults for experiments are injected on the client side (`rtt_ms`: half before the request is
  sent, half after the answer arrives; `loss`: a share of generation tries dropped as
  connection errors before they leave, health probes spared), through an httpx transport
  wrapper, so that loopback experiments see a WAN's round trip without a proxy. Bandwidth is
  not modelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from edgelmm.backends.base import Request, Result
from edgelmm.backends.openai_backend import (
    DONE,
    RETRY_STATUS,
    Answer,
    request_body,
    server_message,
    sse_chunk,
    stream_error,
    whole_result,
)
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError

log = logging.getLogger("edgelmm.collab")
T = TypeVar("T")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
BREAKER_STATES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


def httpx_module() -> Any:
    """httpx, or the one line that names the extra to install."""
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("edge-cloud collaboration", "collab", "httpx") from None
    return httpx


@dataclass
class CloudSettings:
    base_url: str
    model: str | None = None  # None: the one model the cloud serves
    api_key: str | None = None
    timeout_s: float = 10.0  # a whole call, every try included
    connect_timeout_s: float = 2.0
    retries: int = 2
    backoff_s: float = 0.05  # first wait; doubles per retry
    max_connections: int = 64
    breaker_failures: int = 3
    breaker_reset_s: float = 2.0
    rtt_ms: float = 0.0  # injected round-trip delay (client side)
    loss: float = 0.0  # injected share of tries dropped before they are sent
    fault_seed: int = 0
    explicit_sampling: bool = True  # send top_k, min_p and penalties set to off (see openai_backend)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise EdgelmmError(f"--cloud {self.base_url}: not an http(s) URL", "give the cloud's API root, e.g. http://HOST:8000/v1")
        for name in ("timeout_s", "connect_timeout_s", "breaker_reset_s"):
            if not getattr(self, name) > 0:
                raise EdgelmmError(f"cloud {name} must be > 0, got {getattr(self, name)}")
        if self.retries < 0 or self.breaker_failures < 1 or self.rtt_ms < 0 or not 0 <= self.loss < 1:
            raise EdgelmmError("cloud settings: retries >= 0, breaker_failures >= 1, rtt_ms >= 0 and 0 <= loss < 1")


class CloudError(Exception):
    """A call the cloud did not answer; `reason` is a short label (metrics), str() the detail."""

    def __init__(self, reason: str, detail: str, status: int | None = None, code: str | None = None):
        super().__init__(detail)
        self.reason, self.status, self.code = reason, status, code
        self.partial_ids: list[int] = []  # a streamed answer's tokens that had arrived (CloudClient.stream)
        self.partial_text = ""


class Breaker:
    """closed -> (failures in a row) -> open -> (reset time) -> half-open -> closed or open again."""

    def __init__(self, failures: int, reset_s: float):
        self.limit, self.reset_s = failures, reset_s
        self.state, self.failures, self.opened_at, self.opened = CLOSED, 0, 0.0, 0
        self._probing = False

    def allow(self) -> str:
        """CLOSED: go ahead; HALF_OPEN: this caller probes first; OPEN: fail at once."""
        if self.state == OPEN and time.monotonic() - self.opened_at >= self.reset_s and not self._probing:
            self.state, self._probing = HALF_OPEN, True
            return HALF_OPEN
        return OPEN if self.state != CLOSED else CLOSED

    def success(self) -> None:
        self.state, self.failures, self._probing = CLOSED, 0, False

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.limit:
            if self.state != OPEN:
                self.opened += 1
            self.state, self.opened_at, self._probing = OPEN, time.monotonic(), False


def faulty_transport(settings: CloudSettings) -> Any:
    """httpx's transport, with the injected delay and loss of `settings` around each try."""
    httpx = httpx_module()
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=settings.max_connections))
    if not settings.rtt_ms and not settings.loss:
        return inner
    rng, half = random.Random(settings.fault_seed), settings.rtt_ms / 2000

    class Faulty(httpx.AsyncBaseTransport):  # type: ignore[name-defined]
        async def handle_async_request(self, request: Any) -> Any:
            if request.method == "POST" and rng.random() < settings.loss:
                raise httpx.ConnectError("injected loss: the try was dropped", request=request)
            await asyncio.sleep(half)
            response = await inner.handle_async_request(request)
            await asyncio.sleep(half)
            return response

        async def aclose(self) -> None:
            await inner.aclose()

    return Faulty()


class CloudClient:
    """`async with CloudClient(settings) as cloud: result = await cloud.complete(request, params)`."""

    def __init__(self, settings: CloudSettings):
        self.settings = settings
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_reset_s)
        self.model = settings.model or ""
        self.calls = 0
        self.failures: dict[str, int] = {}
        self._client: Any = None

    async def __aenter__(self) -> CloudClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _pool(self) -> Any:
        """The connection pool, opened on first use: it belongs to the event loop that uses it
        (a server's, where the client was checked on another one before the server started)."""
        if self._client is None:
            httpx = httpx_module()
            s = self.settings
            self._client = httpx.AsyncClient(
                base_url=s.base_url, transport=faulty_transport(s),
                headers={"Authorization": f"Bearer {s.api_key}"} if s.api_key else {},
                timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
            )
        return self._client

    async def start(self, check: bool = True) -> None:
        """Open the pool; with `check`, make sure the cloud is an OpenAI-compatible server that
        serves the model (one clear line if not), and learn the model's name if none was given."""
        self._pool()
        s = self.settings
        if check:
            served = await self.served_models()
            if not self.model:
                if len(served) != 1:
                    raise EdgelmmError(f"the cloud at {s.base_url} serves {len(served)} models ({', '.join(served)})",
                                       "name one with --cloud-model")
                self.model = served[0]
            elif self.model not in served:
                raise EdgelmmError(f"the cloud at {s.base_url} does not serve '{self.model}'",
                                   f"it serves: {', '.join(served) or 'nothing'}; fix --cloud-model")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    async def served_models(self) -> list[str]:
        httpx = httpx_module()
        url = f"{self.settings.base_url}/models"
        try:
            response = await self._pool().get("/models", timeout=self.settings.timeout_s)
        except httpx.HTTPError as exc:
            raise EdgelmmError(f"cannot reach the cloud at {url}: {type(exc).__name__}: {exc}",
                               "is the cloud server running, and is --cloud its API root (…/v1)?") from None
        if response.status_code != 200:
            raise EdgelmmError(f"the cloud at {url} answered {response.status_code}: {server_message(response)}",
                               "give the API root of an OpenAI-compatible server (…/v1), and --cloud-api-key if it wants one")
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise EdgelmmError(f"{url} is not an OpenAI-compatible model list",
                               "give the API root of an OpenAI-compatible server (…/v1)") from None

    async def healthy(self) -> bool:
        """A cheap probe (GET /models within the connect time-out)."""
        try:
            response = await self._pool().get("/models", timeout=self.settings.connect_timeout_s)
            return response.status_code == 200
        except Exception:  # noqa: BLE001  (any failure means: not healthy)
            return False

    async def complete(self, request: Request, params: SamplingParams) -> Result:
        """The cloud's answer to `request`; CloudError when it cannot be had within timeout_s."""
        route, body = request_body(self.model, request, params, token_ids=False, stream=False,
                                   explicit=self.settings.explicit_sampling)
        t0 = time.perf_counter()
        return await self.call(route, body, lambda data: whole_result(route, body, data, params, t0, time.perf_counter()))

    async def call(self, route: str, body: dict[str, Any], parse: Callable[[Any], T],
                   headers: dict[str, str] | None = None) -> T:
        """POST `body` to `route` (under the API root; an absolute path such as "/tokenize" goes
        to the server's root when it starts with "//") and `parse` the JSON answer, within
        timeout_s, retried and breaker-guarded as every cloud call is; CloudError otherwise."""
        return await self._guarded(route, lambda tries: self._tries(route, body, parse, tries, headers))

    async def stream(self, request: Request, params: SamplingParams,
                     on_chunk: Callable[[list[int], str], None] | None = None) -> Result:
        """The cloud's answer streamed: `on_chunk(token ids, text)` as each chunk arrives. Retried
        and breaker-guarded as `call` until the first chunk; bounded by timeout_s in all. A
        CloudError carries the tokens that had arrived (`partial_ids`, `partial_text`): after the
        first chunk nothing is retried, since the user may have seen them."""
        route, body = request_body(self.model, request, params, token_ids=True, stream=True,
                                   explicit=self.settings.explicit_sampling)
        answer = Answer(params)
        stamps: list[float] = []
        t0 = time.perf_counter()

        def take(chunk: dict[str, Any]) -> None:
            for ids, _, text in answer.add_chunk(chunk, stamps, time.perf_counter()):
                if on_chunk is not None:
                    on_chunk(ids, text)

        try:
            await self._guarded(route, lambda tries: self._stream_tries(route, body, take, tries))
        except CloudError as exc:
            exc.partial_ids, exc.partial_text = list(answer.ids), answer.text
            raise
        end = time.perf_counter()
        return answer.result(stamps, t0, end)

    async def _guarded(self, route: str, run: Callable[[list[int]], Awaitable[T]]) -> T:
        """`run(tries)` behind the breaker, within timeout_s, logged; CloudError when it fails."""
        gate = self.breaker.allow()
        if gate == OPEN:
            raise self._failed("breaker_open", "the cloud failed repeatedly; not calling it until it answers a probe", 0, 0.0)
        if gate == HALF_OPEN and not await self.healthy():
            self.breaker.failure()
            raise self._failed("breaker_open", "the cloud did not answer its probe; the breaker stays open", 0, 0.0)
        self.calls += 1
        started = time.perf_counter()
        tries = [0]
        try:
            result = await asyncio.wait_for(run(tries), self.settings.timeout_s)
        except asyncio.TimeoutError:
            self.breaker.failure()
            raise self._failed("timeout", f"no answer within {self.settings.timeout_s:g} s", tries[0], started) from None
        except CloudError as exc:
            if exc.reason != "refused":  # a 4xx is this request's fault, not the cloud's
                self.breaker.failure()
            raise self._failed(exc.reason, str(exc), tries[0], started, exc.status, exc.code) from None
        self.breaker.success()
        log.info(json.dumps({"event": "cloud_call", "route": route, "ok": True, "tries": tries[0],
                             "seconds": round(time.perf_counter() - started, 4)}))
        return result

    def _failed(self, reason: str, detail: str, tries: int, started: float, status: int | None = None,
                code: str | None = None) -> CloudError:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        seconds = round(time.perf_counter() - started, 4) if started else 0.0
        log.info(json.dumps({"event": "cloud_call", "ok": False, "reason": reason, "tries": tries, "seconds": seconds,
                             "error": detail}))
        return CloudError(reason, detail, status, code)

    def _url(self, route: str) -> str:
        if route.startswith("//"):  # the server's root (vLLM and edgelmm serve have /tokenize there)
            root = self.settings.base_url
            return (root[: -len("/v1")] if root.endswith("/v1") else root) + route[1:]
        return route

    async def _tries(self, route: str, body: dict[str, Any], parse: Callable[[Any], T], tries: list[int],
                     headers: dict[str, str] | None = None) -> T:
        httpx = httpx_module()
        s = self.settings
        for attempt in range(s.retries + 1):
            tries[0] = attempt + 1
            last = attempt == s.retries
            try:
                response = await self._pool().post(self._url(route), json=body, headers=headers)
            except httpx.HTTPError as exc:
                if last:
                    raise CloudError("unreachable", f"{type(exc).__name__}: {exc}") from None
                await asyncio.sleep(s.backoff_s * 2**attempt)
                continue
            if response.status_code == 200:
                try:
                    return parse(response.json())
                except (ValueError, KeyError, TypeError, IndexError, EdgelmmError) as exc:
                    raise CloudError("bad_response", f"the cloud's answer did not parse: {exc}") from None
            _raise_unless_retried(response, last)
            await asyncio.sleep(s.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _stream_tries(self, route: str, body: dict[str, Any], take: Callable[[dict[str, Any]], None],
                            tries: list[int]) -> None:
        """`_tries` for a streamed answer (server-sent events): each chunk to `take`; tried again
        only while no chunk has arrived."""
        httpx = httpx_module()
        s = self.settings
        received = False
        for attempt in range(s.retries + 1):
            tries[0] = attempt + 1
            last = attempt == s.retries
            try:
                async with self._pool().stream("POST", self._url(route), json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _raise_unless_retried(response, last)
                        await asyncio.sleep(s.backoff_s * 2**attempt)
                        continue
                    async for line in response.aiter_lines():
                        try:
                            chunk = sse_chunk(line)
                            if chunk is DONE:
                                return
                            if chunk is None:
                                continue
                            if "error" in chunk:
                                raise CloudError("broken_stream", f"the cloud failed mid-answer: {stream_error(chunk)}")
                            take(chunk)
                        except (ValueError, KeyError, TypeError, EdgelmmError) as exc:
                            raise CloudError("bad_response", f"a streamed chunk did not parse: {exc}") from None
                        received = True
                    raise CloudError("broken_stream", "the stream ended without its closing [DONE]")
            except httpx.HTTPError as exc:
                if received:
                    raise CloudError("broken_stream", f"the stream broke mid-answer: {type(exc).__name__}: {exc}") from None
                if last:
                    raise CloudError("unreachable", f"{type(exc).__name__}: {exc}") from None
                await asyncio.sleep(s.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _raise_unless_retried(response: Any, last: bool) -> None:
    """A non-200 answer: CloudError unless it is worth another try and one is left."""
    if response.status_code not in RETRY_STATUS:
        raise CloudError("refused", f"{response.status_code}: {server_message(response)}", response.status_code,
                         _error_code(response))
    if last:
        raise CloudError(f"status_{response.status_code}", f"{response.status_code}: {server_message(response)}",
                         response.status_code)


def _error_code(response: Any) -> str | None:
    """The OpenAI error object's `code`, where the answer has one."""
    try:
        error = response.json().get("error")
        return error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None
