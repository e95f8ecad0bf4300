"""How sure the edge model is of its answer: token-level strategies, aggregated over the answer.

A strategy turns one generated position — the chosen token's log-probability and the `top` most
likely tokens there, as every backend returns them with `top_logprobs` — into a confidence in
[0, 1] (1: certain). The policy then aggregates the answer's positions (mean, min, or the mean of
the first k) and compares the result with its threshold. Strategies are small frozen dataclasses
registered by name in `edgelmm.registry.CONFIDENCE`, written as specs like methods:
`'entropy'`, `'temperature(temperature=1.7)'`, `'top_mass(k=2)'`,
`'ensemble(members=["max_prob", "entropy"])'`. A new strategy is one class with a `name` and a
`token` method, plus its registry line (or `CONFIDENCE.register(name, cls)` from a plug-in).

Only the returned top-k is known, not the whole distribution: entropy is computed over the top-k
plus one bucket for the mass they leave, and temperature scaling renormalises over the top-k.
Both are exact when k covers the distribution's support, and close when the top-k hold most of
the mass (the regime where the decision matters: a flat distribution scores low either way).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

from edgelmm.errors import EdgelmmError
from edgelmm.registry import CONFIDENCE

AGGREGATES = ("mean", "min", "first")


@dataclasses.dataclass(frozen=True)
class Position:
    """One generated token: its log-probability and the top alternatives there, best first."""

    logprob: float
    top: Sequence[tuple[int, float]] = ()

    @property
    def top_logprobs(self) -> list[float]:
        return [lp for _, lp in self.top] or [self.logprob]


class Strategy:
    """Base of every confidence strategy; subclasses are frozen kw-only dataclasses."""

    name: ClassVar[str] = "strategy"
    fits_temperature: ClassVar[bool] = False  # `collab calibrate` fits its `temperature` field

    def token(self, position: Position) -> float:
        raise NotImplementedError

    def sequence(self, positions: Sequence[Position], aggregate: str = "mean", first_k: int = 4) -> float:
        """The answer's confidence: its positions' scores aggregated (an empty answer scores 0)."""
        scores = [self.token(p) for p in positions]
        if aggregate == "first":
            scores = scores[:first_k]
        if not scores:
            return 0.0
        return min(scores) if aggregate == "min" else math.fsum(scores) / len(scores)

    def __str__(self) -> str:
        fields = [f for f in dataclasses.fields(self) if f.init]  # type: ignore[arg-type]
        settings = {f.name: getattr(self, f.name) for f in fields if getattr(self, f.name) != f.default}
        return self.name if not settings else f"{self.name}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaxProb(Strategy):
    """The probability of the most likely token (the chosen one when decoding is greedy)."""

    name: ClassVar[str] = "max_prob"

    def token(self, position: Position) -> float:
        return math.exp(max(position.top_logprobs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entropy(Strategy):
    """1 - H / H_max over the top-k and the mass they leave (one bucket), H_max = log(k + 1)."""

    name: ClassVar[str] = "entropy"

    def token(self, position: Position) -> float:
        probs = [math.exp(lp) for lp in position.top_logprobs]
        rest = max(0.0, 1.0 - math.fsum(probs))
        entropy = -math.fsum(p * math.log(p) for p in (*probs, rest) if p > 0)
        return max(0.0, 1.0 - entropy / math.log(len(probs) + 1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Temperature(Strategy):
    """The top probability after temperature scaling (logits / T, renormalised over the top-k);
    T > 1 softens an over-confident model. `collab calibrate` fits T on a calibration split."""

    name: ClassVar[str] = "temperature"
    fits_temperature: ClassVar[bool] = True
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EdgelmmError(f"temperature(temperature={self.temperature}): the temperature must be > 0")

    def token(self, position: Position) -> float:
        lps = position.top_logprobs
        best = max(lps)
        return 1.0 / math.fsum(math.exp((lp - best) / self.temperature) for lp in lps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopMass(Strategy):
    """The probability mass of the k most likely tokens: high when the model hesitates only
    between a few (near-)synonyms, low when it spreads over many."""

    name: ClassVar[str] = "top_mass"
    k: int = 2

    def __post_init__(self) -> None:
        if self.k < 1:
            raise EdgelmmError(f"top_mass(k={self.k}): k must be >= 1")

    def token(self, position: Position) -> float:
        return min(1.0, math.fsum(math.exp(lp) for lp in sorted(position.top_logprobs, reverse=True)[: self.k]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ensemble(Strategy):
    """The weighted mean of several strategies' answer confidences (each aggregated alike)."""

    name: ClassVar[str] = "ensemble"
    members: tuple[str, ...] = ("max_prob", "entropy")
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members:
            raise EdgelmmError("ensemble(members=[...]): name at least one strategy")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.members) or min(self.weights) < 0 or not sum(self.weights):
                raise EdgelmmError(f"ensemble: {len(self.members)} members need as many weights >= 0, not all 0")
        parsed = tuple(parse_strategy(m) for m in self.members)
        if any(isinstance(m, Ensemble) for m in parsed):
            raise EdgelmmError("ensemble: a member cannot be an ensemble itself")
        object.__setattr__(self, "_parsed", parsed)

    @property
    def parts(self) -> tuple[Strategy, ...]:
        return self._parsed  # type: ignore[attr-defined]

    def token(self, position: Position) -> float:
        return self._mix([m.token(position) for m in self.parts])

    def sequence(self, positions: Sequence[Position], aggregate: str = "mean", first_k: int = 4) -> float:
        return self._mix([m.sequence(positions, aggregate, first_k) for m in self.parts])

    def _mix(self, scores: list[float]) -> float:
        weights = self.weights or (1.0,) * len(scores)
        return math.fsum(w * s for w, s in zip(weights, scores)) / math.fsum(weights)

    def with_temperature(self, temperature: float) -> Ensemble:
        members = tuple(str(dataclasses.replace(m, temperature=temperature)) if m.fits_temperature else str(m)  # type: ignore[type-var]
                        for m in self.parts)
        return dataclasses.replace(self, members=members)


def parse_strategy(spec: str | Strategy) -> Strategy:
    """'entropy' or 'temperature(temperature=1.5)' -> the strategy object."""
    if isinstance(spec, Strategy):
        return spec
    strategy = CONFIDENCE.build(spec)
    if not isinstance(strategy, Strategy):
        raise EdgelmmError(f"confidence strategy '{spec}' is not a Strategy", "register a subclass of edgelmm.collab.confidence.Strategy")
    return strategy


def positions(logprobs: Sequence[float] | None, tops: Sequence[Sequence[tuple[int, float]]] | None) -> list[Position]:
    """A result's generated tokens as positions (its logprobs and top_logprobs, as backends return them)."""
    if logprobs is None:
        raise EdgelmmError("the edge backend returned no log-probabilities, which confidence routing needs",
                           "use an edge backend that returns logprobs (torch, llamacpp)")
    tops = tops or [()] * len(logprobs)
    return [Position(lp, tuple(top)) for lp, top in zip(logprobs, tops)]

