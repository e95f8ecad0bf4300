"""Confidence routing: the edge answers, and asks the cloud only when it is unsure.

    router = Router(policy, edge=Engine(edge_backend), cloud=CloudClient(settings))
    routed = await router.answer(Request.chat("What color is the circle?", images=[img]), params)
    routed.result, routed.served_by  # "edge", "cloud" or "edge_fallback"

The edge runs in process, in a serve `Engine` (one thread owns the model, as in `edgelmm
serve`), and returns its tokens' log-probabilities with the top alternatives; the policy turns
them into a confidence and decides. With `early_k` the decision is made after the edge's first k
tokens: an answer kept goes on decoding, an answer escalated keeps decoding too, in the
background, so that if the cloud fails its answer is ready sooner, and is dropped when the cloud
answers. Whatever goes wrong with the cloud (down, slow, refusing, breaker open), the user gets
the edge's own answer, marked `edge_fallback` with the reason: never an error, never two
answers. The time this can take is bounded by the cloud client's `timeout_s`.

With mode `draft_verify` every answer is the cloud's own output, drafted by the edge a few tokens
at a time and verified by the cloud (collab/speculative.py, collab/verify.py) — or, with
`draft_when: faster`, streamed from the cloud decoding alone while drafting measures slower per
token (a fast cloud behind a long round trip; `served_by: cloud`, the reason says so); with
`escalate_by: draft_verify` an escalated request is answered that way, the edge's own answer
verified as the first drafts. A cloud lost mid-answer leaves the agreed tokens, and the edge
finishes alone (`edge_fallback`).

What is not routed: token-id prompts (ids of the edge's tokenizer, which the cloud may not share)
and prompt scoring (`prompt_logprobs`: the edge's scores were asked for) are answered by the edge.
A cloud answer carries no log-probabilities (they would be the cloud's, over its own tokens).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from edgelmm.backends.base import Result, TokenEvent
from edgelmm.collab.client import BREAKER_STATES, CloudClient, CloudError
from edgelmm.collab.confidence import Position
from edgelmm.collab.policy import Policy
from edgelmm.collab.speculative import Drafter, DraftLength, Speculated, Verified, Verifier, speculate
from edgelmm.collab.verify import verifier_for
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request
from edgelmm.serve.engine import Engine, Stream
from edgelmm.serve.metrics import Counter, Gauge, Histogram

EDGE, CLOUD, FALLBACK, DRAFT = "edge", "cloud", "edge_fallback", "draft_verify"


@dataclass
class Routed:
    """One answered request and how it was answered."""

    result: Result
    served_by: str
    confidence: float | None
    edge_s: float | None  # the edge's part (queue included), None where it did not run
    cloud_s: float | None  # the cloud call, tries included, None where it was not called
    total_s: float
    edge_tokens: int
    cloud_tokens: int
    reason: str | None = None  # why the cloud was not asked, or why its answer is missing
    texts: dict[int, str] = field(default_factory=dict)  # edge token texts, for log-probability entries
    queued_s: float = 0.0
    draft: dict[str, Any] | None = None  # draft-verify's statistics (DraftStats.info)

    def info(self) -> dict[str, Any]:
        """The `edgelmm` extension field of an answer (clients ignore fields they do not know)."""
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(1000 * seconds, 3)

        return {"served_by": self.served_by, "confidence": None if self.confidence is None else round(self.confidence, 6),
                "reason": self.reason, "edge_ms": ms(self.edge_s), "cloud_ms": ms(self.cloud_s), "total_ms": ms(self.total_s),
                "edge_tokens": self.edge_tokens, "cloud_tokens": self.cloud_tokens,
                **({"draft_verify": self.draft} if self.draft is not None else {})}


class RouterMetrics:
    """What /metrics shows about routing: where answers came from, cloud failures, the breaker."""

    def __init__(self, router: Router):
        self.answers = Counter("edgelmm_collab_answers_total", "Answers by where they were served.", ("served_by",))
        self.failures = Counter("edgelmm_collab_cloud_failures_total", "Cloud calls that failed, by reason.", ("reason",))
        self.edge = Histogram("edgelmm_collab_edge_seconds", "The edge's part of a request.")
        self.cloud = Histogram("edgelmm_collab_cloud_seconds", "Cloud calls, tries included.")
        self.parts = (
            self.answers, self.failures, self.edge, self.cloud,
            Gauge("edgelmm_collab_cloud_share", "Share of answers served by the cloud.", router.cloud_share),
            Gauge("edgelmm_collab_breaker_state", "The cloud breaker: 0 closed, 1 half-open, 2 open.",
                  lambda: BREAKER_STATES[router.cloud.breaker.state] if router.cloud else 0),
        )

    def observe(self, routed: Routed) -> None:
        self.answers.inc(1, routed.served_by)
        if routed.edge_s is not None:
            self.edge.observe(routed.edge_s)
        if routed.cloud_s is not None:
            self.cloud.observe(routed.cloud_s)


class Router:
    def __init__(self, policy: Policy, edge: Engine | None, cloud: CloudClient | None, protocol: str | None = None):
        if policy.verifies and protocol is None:
            raise EdgelmmError("policy draft_verify needs the verify protocol the cloud supports",
                               "set the router up with collab.server.prepare (it probes the cloud)")
        if policy.runs_edge and edge is None:
            raise EdgelmmError(f"policy mode '{policy.mode}' needs an edge model")
        if policy.mode != "edge" and cloud is None:
            raise EdgelmmError(f"policy mode '{policy.mode}' needs a cloud", "give --cloud URL, or use --policy edge")
        self.policy, self.edge, self.cloud, self.protocol = policy, edge, cloud, protocol
        self.served = {EDGE: 0, CLOUD: 0, FALLBACK: 0, DRAFT: 0}
        self.length = DraftLength(policy.draft_length, policy.draft_max)  # shared: the pair's acceptance rate
        self.metrics = RouterMetrics(self)

    def cloud_share(self) -> float:
        total = sum(self.served.values())
        return (self.served[CLOUD] + self.served[DRAFT]) / total if total else 0.0

    async def answer(self, request: Request, params: SamplingParams, explicit_max_tokens: bool = True,
                     on_token: Any = None) -> Routed:
        """One request's answer. `on_token` (draft-verify only) is handed each token as it is settled."""
        started = time.perf_counter()
        if request.kind == "token_ids" or params.prompt_logprobs is not None:
            reason = "token-id prompt: edge only" if request.kind == "token_ids" else "prompt scoring: edge only"
            routed = await self._edge_only(request, params, explicit_max_tokens, started, reason)
        elif self.policy.mode == "edge":
            routed = await self._edge_only(request, params, explicit_max_tokens, started, None)
        elif self.policy.mode == "draft_verify":
            routed = await self._draft_verify(request, params, started, on_token=on_token)
        elif not self.policy.runs_edge:
            routed = await self._cloud_first(request, params, explicit_max_tokens, started)
        elif self.policy.early_k and self.policy.mode == "route":
            routed = await self._early(request, params, explicit_max_tokens, started, on_token)
        else:
            routed = await self._whole(request, params, explicit_max_tokens, started, on_token)
        self.served[routed.served_by] += 1
        self.metrics.observe(routed)
        return routed

    # ------------------------------------------------------------ the edge's side
    @staticmethod
    def _as_asked(result: Result, params: SamplingParams) -> Result:
        """The edge's result with only the log-probabilities the user asked for."""
        tops = result.top_logprobs
        result.top_logprobs = [t[: params.top_logprobs] for t in tops] if tops is not None and params.top_logprobs else None
        if not params.wants_logprobs:
            result.logprobs = None
        return result

    async def _edge_only(self, request: Request, params: SamplingParams, explicit: bool, started: float,
                         reason: str | None) -> Routed:
        assert self.edge is not None
        done = await self.edge.complete(request, params, explicit)
        result = done.result
        return Routed(result, EDGE, None, done.queued_s + result.timings.e2e_s, None, time.perf_counter() - started,
                      result.counts.generated_tokens, 0, reason, done.texts, done.queued_s)

    async def _whole(self, request: Request, params: SamplingParams, explicit: bool, started: float,
                     on_token: Any = None) -> Routed:
        assert self.edge is not None
        done = await self.edge.complete(request, self.policy.edge_params(params), explicit, texts=params.wants_logprobs)
        edge_s = done.queued_s + done.result.timings.e2e_s
        confidence = self.policy.confidence(done.result)
        edge = self._as_asked(done.result, params)
        if not self.policy.escalates(confidence):
            return Routed(edge, EDGE, confidence, edge_s, None, time.perf_counter() - started, edge.counts.generated_tokens,
                          0, None, done.texts, done.queued_s)
        if self.policy.verifies:
            return await self._draft_verify(request, params, started, confidence, edge_s, edge.token_ids, on_token)
        return await self._ask_cloud(request, params, started, confidence, edge_s, edge.counts.generated_tokens,
                                     lambda: _ready(edge), done.texts)

    async def _early(self, request: Request, params: SamplingParams, explicit: bool, started: float,
                     on_token: Any = None) -> Routed:
        """Decide after the edge's first early_k tokens (see the module doc)."""
        assert self.edge is not None and self.policy.early_k
        stream = self.edge.open_stream(request, self.policy.edge_params(params), explicit, texts=params.wants_logprobs)
        seen: list[Position] = []
        tokens: list[int] = []
        texts: dict[int, str] = {}
        result: Result | None = None
        try:
            async for item in stream:
                texts.update(item.texts)
                if item.event.result is not None:
                    result = item.event.result
                    break
                if item.event.token_id is not None and item.event.logprob is not None:
                    tokens.append(item.event.token_id)
                    seen.append(Position(item.event.logprob, tuple(item.event.top or ())))
                    if len(seen) >= self.policy.early_k:
                        break
        except BaseException:
            stream.cancel()
            raise
        decided_s = time.perf_counter() - started
        confidence = self.policy.scorer.sequence(seen, self.policy.aggregate, self.policy.first_k)
        if result is None and not self.policy.escalates(confidence):
            result = await _finish(stream, texts)
        if result is not None and not self.policy.escalates(confidence):
            edge = self._as_asked(result, params)
            return Routed(edge, EDGE, confidence, time.perf_counter() - started, None, time.perf_counter() - started,
                          edge.counts.generated_tokens, 0, None, texts)
        if self.policy.verifies:
            stream.cancel()
            drafts = result.token_ids if result is not None else tokens
            return await self._draft_verify(request, params, started, confidence, decided_s, drafts, on_token)
        rest = asyncio.ensure_future(_finish(stream, texts) if result is None else _ready(result))

        async def edge_answer() -> Result:
            return self._as_asked(await rest, params)

        try:
            return await self._ask_cloud(request, params, started, confidence, decided_s, len(seen), edge_answer, texts)
        finally:
            stream.cancel()
            rest.cancel()

    async def _draft_verify(self, request: Request, params: SamplingParams, started: float,
                            confidence: float | None = None, edge_s: float = 0.0, first_drafts: list[int] | None = None,
                            on_token: Any = None) -> Routed:
        """The cloud's own output, drafted by the edge (starting from `first_drafts`, the edge's
        answer to an escalated request); the edge finishes alone if the cloud goes."""
        assert self.edge is not None and self.cloud is not None and self.protocol is not None
        if first_drafts is None and self.policy.draft_when == "faster" and not self.length.drafts_pay():
            return await self._cloud_decodes(request, params, started, confidence, edge_s, on_token)
        drafter = Drafter(self.edge.backend)
        out = await speculate(request, params, drafter, verifier_for(self.protocol, self.cloud), self.length,
                              run_edge=self.edge.call, failures=(CloudError,), first_drafts=first_drafts,
                              on_token=on_token)
        if first_drafts is None and out.fallback is None:
            self.length.observe(out.result.timings, drafted=True)
        return self._drafted(out, confidence, edge_s, started)

    def _drafted(self, out: Speculated, confidence: float | None, edge_s: float, started: float) -> Routed:
        if out.fallback is not None:
            self.metrics.failures.inc(1, "mid_answer")
        stats = out.stats
        return Routed(out.result, FALLBACK if out.fallback else DRAFT, confidence, edge_s + stats.edge_s, stats.verify_s,
                      time.perf_counter() - started, stats.drafted, out.result.counts.generated_tokens, out.fallback,
                      draft=stats.info())

    async def _cloud_decodes(self, request: Request, params: SamplingParams, started: float, confidence: float | None,
                             edge_s: float, on_token: Any) -> Routed:
        """A draft-verify answer that the cloud decodes alone, streamed (drafting measured slower:
        see DraftLength.drafts_pay); if the cloud fails, the edge finishes from what had arrived."""
        assert self.edge is not None and self.cloud is not None
        cloud_started = time.perf_counter()

        def relay(ids: list[int], text: str) -> None:
            if on_token is not None and text:
                on_token(TokenEvent(ids[0] if len(ids) == 1 else None, text, None, time.perf_counter() - started))

        try:
            result = await self.cloud.stream(request, _cloud_params(params), relay)
        except CloudError as exc:  # counted as a mid-answer failure, as a draft-verify answer's
            settled, text, edge = exc.partial_ids, exc.partial_text, self.edge.backend
            if text and not settled:  # a server that sends no ids: the edge reads the text (the same tokenizer)
                settled = await self.edge.call(lambda: edge.tokenize(text, add_special_tokens=False))
            out = await speculate(request, params, Drafter(edge), _Lost(exc), self.length,
                                  run_edge=self.edge.call, failures=(CloudError,), on_token=on_token, settled=settled)
            return self._drafted(out, confidence, edge_s, started)
        self.length.observe(result.timings, drafted=False)
        rates = f"{1000 * (self.length.t_drafted or 0):.2f} ms/token drafted, {1000 * (self.length.t_cloud or 0):.2f} alone"
        result.decode_path = "cloud (streamed)"
        return Routed(result, CLOUD, confidence, edge_s, time.perf_counter() - cloud_started, time.perf_counter() - started,
                      0, result.counts.generated_tokens, f"draft-verify: the cloud decoded alone ({rates})")

    # ------------------------------------------------------------ the cloud's side
    async def _ask_cloud(self, request: Request, params: SamplingParams, started: float, confidence: float | None,
                         edge_s: float | None, edge_tokens: int, edge_answer: Any, texts: dict[int, str]) -> Routed:
        """The cloud's answer; the edge's (from `edge_answer()`) flagged when the cloud fails."""
        assert self.cloud is not None
        cloud_started = time.perf_counter()
        try:
            result = await self.cloud.complete(request, _cloud_params(params))
        except CloudError as exc:
            self.metrics.failures.inc(1, exc.reason)
            cloud_s = time.perf_counter() - cloud_started
            edge = await edge_answer()
            return Routed(edge, FALLBACK, confidence, edge_s, cloud_s, time.perf_counter() - started,
                          edge.counts.generated_tokens, 0, f"cloud failed ({exc.reason}): {exc}", texts)
        return Routed(result, CLOUD, confidence, edge_s, time.perf_counter() - cloud_started, time.perf_counter() - started,
                      edge_tokens, result.counts.generated_tokens)

    async def _cloud_first(self, request: Request, params: SamplingParams, explicit: bool, started: float) -> Routed:
        """mode cloud: the cloud alone; the edge answers (flagged) only when the cloud fails."""

        async def edge_answer() -> Result:
            if self.edge is None:
                raise EdgelmmError("the cloud failed and there is no edge model to answer instead")
            return (await self.edge.complete(request, params, explicit)).result

        return await self._ask_cloud(request, params, started, None, None, 0, edge_answer, {})


class _Lost(Verifier):
    """The verifier of an answer whose cloud already failed: the edge finishes alone."""

    protocol = "none"

    def __init__(self, error: CloudError):
        self.error = error

    async def open(self, request: Request) -> None:
        raise self.error

    async def verify(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        raise self.error


def _cloud_params(params: SamplingParams) -> SamplingParams:
    """What the cloud is asked for: no log-probabilities (they would be over the cloud's tokens)."""
    return params.model_copy(update={"logprobs": False, "top_logprobs": 0})


async def _ready(result: Result) -> Result:
    return result


async def _finish(stream: Stream, texts: dict[int, str]) -> Result:
    """The rest of an edge stream, up to its result."""
    async for item in stream:
        texts.update(item.texts)
        if item.event.result is not None:
            return item.event.result
    raise EdgelmmError("the edge's stream ended without a result")
