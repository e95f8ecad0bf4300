"""Draft–verify decoding: the edge drafts a few tokens, the cloud checks them in one forward pass.

    drafter = Drafter(edge_backend)                       # a torch backend: its KV state is kept
    verifier = LocalVerifier(cloud_backend)               # or NativeVerifier / GenericVerifier (HTTP)
    out = await speculate(request, params, drafter, verifier, DraftLength())
    out.result.token_ids, out.stats.acceptance_rate

Each round the edge extends its own KV state by k drafted tokens; the verifier returns the cloud's
distribution (its top-k log-probabilities) after every position of the agreed text plus the
drafts, and the answer keeps the longest accepted prefix plus one token of the cloud's own — so a
round yields between 1 and k+1 tokens for one cloud forward pass.

- Greedy (temperature 0): a draft is accepted while it is the cloud's argmax; the cloud's argmax
  follows. The output is the cloud's own greedy output (up to ties and float rounding between a
  k-token and a 1-token forward pass, which the benchmarks measure).
- Sampling: speculative sampling (Leviathan et al., Chen et al.): draft x ~ q (the edge's
  distribution after the request's temperature / top-k / top-p), accepted with probability
  min(1, p(x)/q(x)); on rejection the token is drawn from max(0, p - q), renormalised; after k
  accepted drafts one more is drawn from p. Here p is the cloud's distribution over the top
  `top_logprobs` tokens it returns, transformed the same way. That is exact when the request's own
  truncation (top_k <= top_logprobs, or a top_p reached inside them) leaves no token outside that
  set; otherwise the cloud's tail beyond its top-k is dropped, which is the approximation.

The draft length adapts (`DraftLength`): from the running acceptance rate a and the measured time
of a drafted token and of a verify round, it picks the k that maximises expected tokens per
second, (1 - a^(k+1)) / (1 - a) / (k * t_draft + t_round). Drafting does not always pay: each
round costs a round trip, and a cloud that decodes a token in less time than the link's round
trip over the tokens a round yields answers sooner alone. `DraftLength.drafts_pay` compares the
two rates measured on recent answers (the router then streams the cloud's own answer: the same
output).
"""

from __future__ import annotations

import collections
import functools
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgelmm.backends.base import Counts, Detokenizer, Result, Timings, TokenEvent
from edgelmm.backends.kvstate import top_of
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request

Dist = list[tuple[int, float]]  # (token id, log-probability), best first: the top-k at one position
TOP_K = 20  # alternatives a verifier asks the cloud for when sampling (the OpenAI API's maximum)
EXPLORE = 16  # DraftLength.drafts_pay: one answer in this many takes the way not chosen,
MEASURED = 3  # once each way has been measured on this many answers;
RATES = 8  # the rates of the last this many answers of each way are kept


@dataclass
class Verified:
    """A verifier's answer for one round: the cloud's distribution at each of the k drafted
    positions and after the last draft (k + 1), and what it cost the cloud."""

    dists: list[Dist]
    processed: int  # tokens the cloud read for this round, beyond an opening prompt
    forward_passes: int  # the cloud's forward passes for it
    prompt: int = 0  # prompt tokens the cloud prefilled for it (a session opened)


class Verifier(ABC):
    """The cloud's side of draft–verify (in process, or over HTTP)."""

    protocol = "base"

    @abstractmethod
    async def open(self, request: Request) -> None:
        """A new answer to `request` begins (a session, or nothing, depending on the protocol)."""

    @abstractmethod
    async def verify(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        """The cloud's distributions after `agreed` + each prefix of `drafts` (len(drafts) + 1 of them)."""

    async def close(self) -> None:  # noqa: B027  (most verifiers hold nothing)
        """The answer is finished (or abandoned): release what the cloud keeps for it."""


@dataclass
class DraftStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    corrections: list[int] = field(default_factory=list)  # output positions where the cloud replaced a draft
    draft_lengths: list[int] = field(default_factory=list)
    cloud_tokens_processed: int = 0  # read by verify rounds (for the generic protocol: everything, every round)
    cloud_prompt_tokens: int = 0  # prefilled when a session opened
    cloud_forward_passes: int = 0
    edge_s: float = 0.0
    verify_s: float = 0.0
    protocol: str = ""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def info(self) -> dict[str, Any]:
        out = asdict(self)
        out["acceptance_rate"] = None if self.drafted == 0 else round(self.accepted / self.drafted, 4)
        out["edge_s"], out["verify_s"] = round(self.edge_s, 6), round(self.verify_s, 6)
        return out


class DraftLength:
    """The number of tokens to draft next: `fixed`, or adapted (see the module doc)."""

    def __init__(self, fixed: int | None = None, k_max: int = 8, initial: int = 4, decay: float = 0.8):
        for name, value in (("draft length", fixed), ("k_max", k_max), ("initial draft length", initial)):
            if value is not None and value < 1:
                raise EdgelmmError(f"the {name} must be at least 1, got {value}", "draft one token or more per round")
        self.fixed, self.k_max, self.initial, self.decay = fixed, k_max, min(initial, k_max), decay
        self.accepted, self.trials = 2.0, 3.0  # a prior of a = 2/3, outweighed after a few rounds
        self.t_draft: float | None = None
        self.t_round: float | None = None  # a verify round's wall time, the round trip included
        self.drafted_rates: collections.deque[float] = collections.deque(maxlen=RATES)  # observe()
        self.cloud_rates: collections.deque[float] = collections.deque(maxlen=RATES)
        self.answers = 0

    @property
    def rate(self) -> float:
        return min(self.accepted / self.trials, 0.999)

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.t_draft is None or self.t_round is None:
            return self.initial
        a = self.rate
        return max(range(1, self.k_max + 1),
                   key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (k * self.t_draft + self.t_round))  # type: ignore[operator]

    def observe(self, timings: Timings, drafted: bool) -> None:
        """An answer's steady time per token, drafted or decoded by the cloud alone (streamed)."""
        rate = steady_token_s(timings)
        if rate is not None:
            (self.drafted_rates if drafted else self.cloud_rates).append(rate)

    @property
    def t_drafted(self) -> float | None:
        """Seconds per token of recent drafted answers (the median: a cold first one is an outlier)."""
        return statistics.median(self.drafted_rates) if self.drafted_rates else None

    @property
    def t_cloud(self) -> float | None:
        """Seconds per token of recent answers the cloud decoded alone."""
        return statistics.median(self.cloud_rates) if self.cloud_rates else None

    def drafts_pay(self) -> bool:
        """Whether the next answer should be drafted (True) or decoded by the cloud alone (False):
        by the lower of the two measured times per token (`observe`). Until each way has MEASURED
        answers the two take turns; after that every EXPLORE-th answer takes the way not chosen, so
        that both follow the link and the cloud's load."""
        self.answers += 1
        drafted, alone = self.t_drafted, self.t_cloud
        if drafted is None or alone is None or min(len(self.drafted_rates), len(self.cloud_rates)) < MEASURED:
            return len(self.drafted_rates) <= len(self.cloud_rates)
        better = drafted <= alone
        return not better if self.answers % EXPLORE == 0 else better

    def update(self, drafted: int, accepted: int, draft_s: float, round_s: float | None) -> None:
        """After a round: `accepted` of `drafted` (a rejection ends a round's acceptance); `round_s`
        None for a round whose time says nothing of the next ones (it opened a session: the
        prompt's prefill, which an answer the cloud decodes alone pays too, before its first token)."""
        if drafted:
            self.accepted = self.decay * self.accepted + accepted
            self.trials = self.decay * self.trials + accepted + (1 if accepted < drafted else 0)
            per = draft_s / drafted
            self.t_draft = per if self.t_draft is None else 0.7 * self.t_draft + 0.3 * per
        if round_s is not None:
            self.t_round = round_s if self.t_round is None else 0.7 * self.t_round + 0.3 * round_s


def steady_token_s(timings: Timings) -> float | None:
    """Seconds per token after the first tokens an answer got at once (a first round's accepted
    drafts, a first chunk): the rate at which the rest arrived; None when nothing came later."""
    gaps = timings.decode_s
    leading = next((i for i, gap in enumerate(gaps) if gap > 0), len(gaps))
    later = len(gaps) - leading
    return sum(gaps) / later if later else None


def warp(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after the request's temperature, top-k and top-p (over the last dimension)."""
    if params.greedy:
        out = torch.zeros_like(logprobs)
        out[..., logprobs.argmax(-1)] = 1.0
        return out
    scaled = logprobs.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(-1) - ordered
        ordered = ordered.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return probs / probs.sum(-1, keepdim=True)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


class Drafter:
    """The edge's side: a torch backend's KV state for the answer in progress."""

    def __init__(self, backend: Any):
        runner = getattr(backend, "kv_runner", None)
        if runner is None:
            raise EdgelmmError(f"draft-verify drafts on a torch edge; the {backend.name} backend keeps no KV state for it",
                               "run the edge with --edge-backend torch, or route with another policy")
        self.runner = runner()
        self.end_tokens = set(backend.adapter.eos_token_ids())
        self.decode = backend.adapter.decode
        self.state: Any = None

    def start(self, request: Request) -> int:
        """Prefill the prompt; its length in tokens."""
        self.state, _ = self.runner.open(request)
        return int(self.state.prompt_tokens)

    def draft(self, agreed: list[int], k: int, params: SamplingParams,
              generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """Up to k tokens after `agreed` (fewer when one ends the answer), each with the edge's
        (warped) distribution it was drawn from (empty when greedy)."""
        prompt = self.state.ids[: self.state.prompt_tokens]
        logits = self.runner.tail(self.state, prompt + agreed, 1)[0][-1]
        drafts: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(k):
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = warp(torch.log_softmax(logits, -1), params)
                token = _draw(q, generator)
                dists.append(q)
            drafts.append(token)
            if token in self.end_tokens or i == k - 1:
                break
            logits = self.runner.extend(self.state, [token])[-1]
        return drafts, dists

    def alone(self, agreed: list[int], params: SamplingParams, generator: torch.Generator | None,
              top: int) -> tuple[int, Dist]:
        """The edge's own next token (the cloud is gone), with the edge's top-k there."""
        prompt = self.state.ids[: self.state.prompt_tokens]
        logits = self.runner.tail(self.state, prompt + agreed, 1)[0]
        token = int(logits[0].argmax()) if params.greedy else _draw(warp(torch.log_softmax(logits[0], -1), params), generator)
        dist = top_of(logits, top)[0]
        if all(t != token for t, _ in dist):
            dist.append((token, float(torch.log_softmax(logits[0].float(), -1)[token])))
        return token, dist


class LocalVerifier(Verifier):
    """The cloud model in this process (a torch backend): its KV state kept across rounds."""

    protocol = "local"

    def __init__(self, backend: Any, run: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None):
        self.runner = Drafter(backend).runner
        self.run = run or _inline
        self.request: Request | None = None
        self.state: Any = None

    async def open(self, request: Request) -> None:
        self.request, self.state = request, None

    async def verify(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        if self.state is None:  # the first round: the prompt and the drafts in one prefill
            def first() -> tuple[list[Dist], int]:
                self.state, rows = self.runner.open(self.request, agreed + drafts)
                return top_of(rows[-(len(drafts) + 1):], top), self.state.prompt_tokens

            dists, prompt = await self.run(first)
            return Verified(dists, len(agreed) + len(drafts), 1, prompt)

        def work() -> tuple[list[Dist], int]:
            prompt = self.state.ids[: self.state.prompt_tokens]
            rows, read = self.runner.tail(self.state, prompt + agreed + drafts, len(drafts) + 1)
            return top_of(rows, top), read

        dists, read = await self.run(work)
        return Verified(dists, read, 1)


async def _inline(work: Callable[[], Any]) -> Any:
    return work()


def accept(drafts: list[int], edge_dists: list[torch.Tensor], dists: list[Dist], params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """(how many drafts are accepted, the token that follows them) for one round."""
    if params.greedy:
        m = 0
        while m < len(drafts) and dists[m][0][0] == drafts[m]:
            m += 1
        return m, dists[m][0][0]
    for i, token in enumerate(drafts):
        ids = torch.tensor([t for t, _ in dists[i]])
        p = warp(torch.tensor([lp for _, lp in dists[i]]), params)
        q = edge_dists[i][ids]  # the edge's probabilities of the cloud's candidates
        where = (ids == token).nonzero()
        p_x = float(p[where[0, 0]]) if len(where) else 0.0
        q_x = float(edge_dists[i][token])
        if q_x > 0 and float(torch.rand((), generator=generator)) < min(1.0, p_x / q_x):
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:
            residual = p
        return i, int(ids[_draw(residual / residual.sum(), generator)])
    last = dists[len(drafts)]
    p = warp(torch.tensor([lp for _, lp in last]), params)
    return len(drafts), last[_draw(p, generator)][0]


@dataclass
class Speculated:
    result: Result
    stats: DraftStats
    fallback: str | None = None  # why the edge finished the answer alone (the cloud failed)


async def speculate(request: Request, params: SamplingParams, drafter: Drafter, verifier: Verifier, length: DraftLength,
                    run_edge: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
                    failures: tuple[type[BaseException], ...] = (), first_drafts: list[int] | None = None,
                    on_token: Callable[[TokenEvent], None] | None = None, settled: list[int] | None = None) -> Speculated:
    """One answer by draft–verify (see the module doc). A verifier error of a type in `failures`
    (the cloud lost mid-answer) leaves the tokens agreed so far, and the edge finishes alone.
    `first_drafts` (greedy only): tokens the edge already has — its own answer to a request that
    was escalated — verified as the first round's drafts instead of drafting anew. `on_token`
    is handed each token as its round settles it (a stream), with the text it lets the user see.
    `settled`: tokens of the answer that are already decided (and shown: a cloud stream that broke
    off), taken first without being handed on."""
    run = run_edge or _inline
    t0 = time.perf_counter()
    stats = DraftStats(protocol=verifier.protocol)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    top = max(1 if params.greedy else TOP_K, params.top_logprobs)
    prompt_tokens = await run(lambda: drafter.start(request))
    detok = Detokenizer(drafter.decode, params.stop, drafter.end_tokens)
    agreed: list[int] = []
    scores: list[Dist] = []  # the cloud's top-k at each agreed position (the edge's after a fallback)
    stamps: list[float] = []
    fallback = None

    def take(tokens: list[int], dists: list[Dist], shown: bool = False) -> bool:
        """Append tokens to the answer (`shown`: already handed on); True once it is finished."""
        now = time.perf_counter()
        for token, dist in zip(tokens, dists):
            agreed.append(token)
            scores.append(dist)
            stamps.append(now)
            delta = detok.push(token)
            if on_token is not None and not shown:
                on_token(TokenEvent(token, delta, next((lp for t, lp in dist if t == token), None), now - t0))
            if token in drafter.end_tokens or detok.stopped is not None or len(agreed) >= params.max_new_tokens:
                return True
        return False

    finished = params.max_new_tokens == 0 or take(settled or [], [[] for _ in settled or []], shown=True)
    try:
        await verifier.open(request)
        while not finished:
            k = min(length.next(), params.max_new_tokens - len(agreed) - 1)
            started = time.perf_counter()
            if first_drafts and params.greedy and not agreed:
                drafts, edge_dists = first_drafts[: max(0, params.max_new_tokens - 1)], []
            else:
                drafts, edge_dists = (await run(functools.partial(drafter.draft, agreed, k, params, generator))
                                      if k > 0 else ([], []))
            drafted = time.perf_counter()
            verified = await verifier.verify(agreed, drafts, top)
            done = time.perf_counter()
            m, token = accept(drafts, edge_dists, verified.dists, params, generator)
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.draft_lengths.append(len(drafts))
            stats.cloud_tokens_processed += verified.processed
            stats.cloud_prompt_tokens += verified.prompt
            stats.cloud_forward_passes += verified.forward_passes
            stats.edge_s += drafted - started
            stats.verify_s += done - drafted
            if m < len(drafts):
                stats.corrections.append(len(agreed) + m)
            if stats.rounds > 1 or not first_drafts:  # the edge's own answer says nothing of the draft length
                length.update(len(drafts), m, drafted - started, None if verified.prompt else done - drafted)
            before = len(agreed)
            finished = take(drafts[:m] + [token], verified.dists[: m + 1])
            stats.accepted += min(m, len(agreed) - before)  # drafts past the answer's end are not counted
    except failures as exc:
        fallback = f"the cloud failed mid-answer after {len(agreed)} agreed tokens: {exc}"
        while not finished:
            token, dist = await run(lambda: drafter.alone(agreed, params, generator, top))
            finished = take([token], [dist])
    finally:
        await verifier.close()
    tail = detok.flush()
    end = time.perf_counter()
    if tail and on_token is not None:
        on_token(TokenEvent(None, tail, None, end - t0))
    finish, reason = "length", None  # type: str, str | int | None
    if detok.stopped is not None:
        finish, reason = "stop", detok.stopped
    elif agreed and agreed[-1] in drafter.end_tokens:
        finish, reason = "stop", agreed[-1]
    logprobs = [next((lp for t, lp in dist if t == token), -math.inf) for token, dist in zip(agreed, scores)]
    result = Result(
        text=detok.final_text, token_ids=agreed, logprobs=logprobs if params.wants_logprobs else None,
        timings=Timings.from_stamps(t0, stamps, end), counts=Counts(prompt_tokens, 0, len(agreed)), peak_memory_bytes=None,
        finish_reason=finish, stop_reason=reason,
        top_logprobs=[d[: params.top_logprobs] for d in scores] if params.top_logprobs else None,
        decode_path=f"draft-verify ({verifier.protocol})",
    )
    return Speculated(result, stats, fallback)
