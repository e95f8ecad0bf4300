"""`edgelmm collab serve`: the edge's OpenAI-compatible server, routing to the cloud.

It is `edgelmm serve` — the same routes, limits, API key, error objects and metrics — with a
`RoutingEngine` in the place of the serve `Engine`: every generation request goes through the
`Router`, and its answer carries an `edgelmm` extension field (`served_by`, `confidence`,
`reason`, edge / cloud / total milliseconds, tokens each side) that the official `openai`
client keeps in `model_extra`. A streamed draft-verify answer is sent round by round as its
tokens are settled; any other streamed answer once the route is decided (the edge's whole
answer, or the cloud's); the extension field rides on the last chunk. `/metrics` adds the
cloud share, cloud failures by reason and the breaker's state; `/health` adds the cloud's.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from edgelmm.backends.base import TokenEvent
from edgelmm.collab.client import CloudClient, CloudSettings
from edgelmm.collab.policy import Policy
from edgelmm.collab.router import Routed, Router
from edgelmm.collab.verify import prepare
from edgelmm.config import SamplingParams
from edgelmm.request import Request
from edgelmm.serve.engine import Completion, Engine, StreamItem
from edgelmm.serve.errors import as_api_error


def _items(routed: Routed) -> list[StreamItem]:
    """A routed answer as stream items: its text at once, then its end (with the extension field)."""
    result = routed.result
    items = [StreamItem(TokenEvent(None, result.text, None, routed.total_s), {})] if result.text else []
    return items + [StreamItem(TokenEvent(None, "", None, routed.total_s, result=result), {}, routed.info())]


class RoutedStream:
    """What `Engine.open_stream` returns, for a routed answer: a draft-verify answer's tokens as
    each round settles them, any other answer whole once the route is decided; the last item
    carries the result and the extension field."""

    def __init__(self, start: Any):
        self._queue: asyncio.Queue[StreamItem | None] = asyncio.Queue()
        self._streamed = False
        self._tail: list[StreamItem] | None = None

        def on_token(event: TokenEvent) -> None:
            self._streamed = True
            self._queue.put_nowait(StreamItem(event, {}))

        self._work = asyncio.ensure_future(start(on_token))
        self._work.add_done_callback(lambda _: self._queue.put_nowait(None))

    def cancel(self) -> None:
        self._work.cancel()

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> StreamItem:
        if self._tail is None:
            item = await self._queue.get()
            if item is not None:
                return item
            try:
                routed = self._work.result()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self._tail = []
                raise as_api_error(exc) from None
            self._tail = _items(routed)[-1:] if self._streamed else _items(routed)
        if not self._tail:
            raise StopAsyncIteration
        return self._tail.pop(0)


class RoutingEngine:
    """The serve Engine's interface over a Router (the edge Engine does the token work)."""

    def __init__(self, edge: Engine, router: Router):
        self.edge, self.router = edge, router
        self.backend = edge.backend
        self.max_context = edge.max_context

    @property
    def queued(self) -> int:
        return self.edge.queued

    @property
    def running(self) -> int:
        return self.edge.running

    def status(self) -> dict[str, Any]:
        cloud = self.router.cloud
        return {**self.edge.status(), "policy": self.router.policy.label(), "cloud_share": round(self.router.cloud_share(), 4),
                "cloud": None if cloud is None else {"url": cloud.settings.base_url, "model": cloud.model,
                                                     "breaker": cloud.breaker.state}}

    async def complete(self, request: Request, params: SamplingParams, explicit_max_tokens: bool = True) -> Completion:
        routed = await self.router.answer(request, params, explicit_max_tokens)
        return Completion(routed.result, routed.queued_s, routed.texts, routed.info())

    def open_stream(self, request: Request, params: SamplingParams, explicit_max_tokens: bool = True) -> RoutedStream:
        return RoutedStream(lambda on_token: self.router.answer(request, params, explicit_max_tokens, on_token))

    async def call(self, work: Any) -> Any:
        return await self.edge.call(work)

    def close(self) -> None:
        self.edge.close()


    def attach(self, app: Any) -> None:
        """Called by `serve.server.build` once the app exists: the routing metrics join its own."""
        app.state.server.metrics.extra.extend(self.router.metrics.parts)


def check_cloud(settings: CloudSettings) -> CloudClient:
    """A client for a cloud that answers as an OpenAI-compatible server serving the model (its
    name learned when none was given); one clear line otherwise. Its pool is closed again (the
    server's event loop opens its own on the first call)."""

    async def check(client: CloudClient) -> None:
        try:
            await client.start(check=True)
        finally:
            await client.aclose()

    client = CloudClient(settings)
    asyncio.run(check(client))
    return client


def wrap(policy: Policy, cloud: CloudClient | None) -> Any:
    """What `serve.server.build(..., wrap=...)` takes: the edge Engine -> a RoutingEngine. A
    draft_verify policy learns the cloud's verify protocol here, once the edge's tokenizer is
    loaded (routing instead, with a line that says why, where draft-verify cannot run)."""

    def routing(edge: Engine) -> RoutingEngine:
        run, protocol = policy, None
        if policy.verifies:
            run, protocol, notice = asyncio.run(_prepared(policy, cloud, edge))
            print(f"edgelmm: {notice}", file=sys.stderr)
        return RoutingEngine(edge, Router(run, edge, cloud, protocol))

    return routing


async def _prepared(policy: Policy, cloud: CloudClient | None, edge: Engine) -> tuple[Policy, str | None, str | None]:
    async def edge_ids(text: str) -> list[int]:
        return list(edge.backend.tokenize(text, add_special_tokens=False))

    try:
        return await prepare(policy, cloud, edge_ids, edge.backend)
    finally:
        if cloud is not None:
            await cloud.aclose()  # the server's event loop opens its own pool
