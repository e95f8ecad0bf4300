"""Fitting a policy and measuring what routing is worth, from per-request records.

A record is one sample answered by the edge (`confidence positions`: its tokens' log-probabilities
and top alternatives, `edge_score`) and by the cloud (`cloud_score`). From a set of them, any
strategy's routing curve follows without running a model again: sort the samples by the edge's
confidence, send the k least confident to the cloud, for k = 0..n. RouteLLM's summary figures
come from that curve, with PGR (performance gap recovered) = (accuracy - edge) / (cloud - edge):

- CPT(x): the smallest share of requests sent to the cloud whose PGR reaches x;
- APGR: the area under PGR over the cloud share, from 0 to 1.

`fit` chooses a threshold on one split (a target cloud share, or a target share of the cloud's
accuracy) and, for strategies that have one, the temperature (the one that minimises the binary
cross-entropy of answer confidence against correctness). Report it on another split. A threshold
that just reaches its target on the split it was fitted on misses it on about half of the splits
it meets later; with `confidence_level` (say 0.9) the fit takes the threshold that meets the
target on that share of bootstrap resamples of the calibration split instead, paying a little
more cloud share for a target that holds on new requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelmm.collab.client import CloudSettings
from edgelmm.collab.confidence import Ensemble, Position, Strategy, parse_strategy
from edgelmm.collab.policy import Policy
from edgelmm.config import ModelSpec, SamplingParams, TaskSpec
from edgelmm.errors import EdgelmmError
from edgelmm.utils.io import output_parent

RESAMPLES = 1000  # bootstrap resamples of the calibration split for `confidence_level`
TEMPERATURES = tuple(round(0.25 * 1.1**i, 4) for i in range(37))  # 0.25 .. ~7.9, geometric


@dataclass
class Sample:
    """One sample as both sides answered it."""

    positions: list[Position]
    edge_score: float
    cloud_score: float


def samples_from(edge_rows: Sequence[dict[str, Any]], cloud_rows: Sequence[dict[str, Any]]) -> list[Sample]:
    """Pair edge and cloud rows by sample id (both runs of the same samples)."""
    cloud = {r["id"]: r["score"] for r in cloud_rows}
    missing = [r["id"] for r in edge_rows if r["id"] not in cloud]
    if missing:
        raise EdgelmmError(f"{len(missing)} edge samples have no cloud answer (first: {missing[0]})",
                           "run the edge and the cloud on the same samples")
    return [Sample([Position(lp, tuple((int(t), float(v)) for t, v in top)) for lp, top in r["positions"]],
                   r["score"], cloud[r["id"]]) for r in edge_rows]


def confidences(strategy: Strategy, samples: Sequence[Sample], aggregate: str, first_k: int) -> list[float]:
    return [strategy.sequence(s.positions, aggregate, first_k) for s in samples]


@dataclass
class Curve:
    """Routing the k least confident samples to the cloud, k = 0..n."""

    shares: list[float]
    accuracies: list[float]
    thresholds: list[float]  # escalate when confidence < threshold, for each point
    edge_accuracy: float
    cloud_accuracy: float

    def pgr(self, accuracy: float) -> float:
        gap = self.cloud_accuracy - self.edge_accuracy
        return (accuracy - self.edge_accuracy) / gap if gap > 0 else 1.0

    def cpt(self, x: float) -> float | None:
        """Smallest cloud share whose PGR reaches x; None if none does."""
        return next((s for s, a in zip(self.shares, self.accuracies) if self.pgr(a) >= x - 1e-12), None)

    def apgr(self) -> float:
        pgrs = [self.pgr(a) for a in self.accuracies]
        return math.fsum((b - a) * (p + q) / 2 for a, b, p, q in zip(self.shares, self.shares[1:], pgrs, pgrs[1:]))

    def share_for_quality(self, quality: float) -> float | None:
        """Smallest cloud share whose accuracy reaches `quality` x the cloud's."""
        return next((s for s, a in zip(self.shares, self.accuracies) if a >= quality * self.cloud_accuracy - 1e-12), None)

    def summary(self) -> dict[str, Any]:
        return {"edge_accuracy": self.edge_accuracy, "cloud_accuracy": self.cloud_accuracy, "cpt50": self.cpt(0.5),
                "cpt80": self.cpt(0.8), "apgr": self.apgr(), "share_for_97": self.share_for_quality(0.97),
                "share_for_99": self.share_for_quality(0.99)}


def curve(conf: Sequence[float], samples: Sequence[Sample]) -> Curve:
    """The routing curve; samples of equal confidence go to the cloud together (one threshold
    cannot split them), so the points are at the distinct confidences. Each point's threshold
    lies half-way between the last confidence sent and the next one kept: the widest margin,
    for samples that were not in the fit."""
    n = len(samples)
    if n == 0:
        raise EdgelmmError("no samples to build a routing curve from")
    order = sorted(range(n), key=lambda i: conf[i])
    edge_total = math.fsum(s.edge_score for s in samples)
    shares, accuracies, thresholds = [0.0], [edge_total / n], [min(conf)]
    gained = 0.0
    for k, i in enumerate(order, start=1):
        gained += samples[i].cloud_score - samples[i].edge_score
        if k < n and conf[order[k]] == conf[i]:
            continue  # ties move together
        shares.append(k / n)
        accuracies.append((edge_total + gained) / n)
        thresholds.append((conf[i] + conf[order[k]]) / 2 if k < n else math.inf)  # half-way to the next one
    return Curve(shares, accuracies, thresholds, edge_total / n, math.fsum(s.cloud_score for s in samples) / n)


def fit_temperature(strategy: Strategy, samples: Sequence[Sample], aggregate: str, first_k: int) -> Strategy:
    """The strategy with the temperature that best predicts correctness (binary cross-entropy)."""
    def loss(candidate: Strategy) -> float:
        total = 0.0
        for c, s in zip(confidences(candidate, samples, aggregate, first_k), samples):
            c = min(max(c, 1e-6), 1 - 1e-6)
            total -= s.edge_score * math.log(c) + (1 - s.edge_score) * math.log(1 - c)
        return total

    def at(t: float) -> Strategy:
        if isinstance(strategy, Ensemble):
            return strategy.with_temperature(t)
        return dataclasses.replace(strategy, temperature=t)  # type: ignore[type-var]

    if not (strategy.fits_temperature or (isinstance(strategy, Ensemble) and any(m.fits_temperature for m in strategy.parts))):
        return strategy
    return min((at(t) for t in TEMPERATURES), key=loss)


def check_targets(target_share: float | None, target_quality: float | None, confidence_level: float | None) -> None:
    """The targets `fit` accepts (checked before any model runs)."""
    if (target_share is None) == (target_quality is None):
        raise EdgelmmError("give exactly one target: a cloud share or a quality (share of the cloud's accuracy)")
    if target_share is not None and not 0 <= target_share <= 1:
        raise EdgelmmError(f"target cloud share {target_share} is outside [0, 1]")
    if target_quality is not None and not 0 < target_quality <= 1:
        raise EdgelmmError(f"target quality {target_quality} is outside (0, 1]")
    if confidence_level is not None and not 0 < confidence_level < 1:
        raise EdgelmmError(f"confidence level {confidence_level} is outside (0, 1)", "give, say, 0.9")


def _meets_target(conf: Sequence[float], samples: Sequence[Sample], routes: Curve, target_share: float | None,
                  target_quality: float | None, level: float | None) -> list[bool]:
    """For each point of `routes`: whether its threshold meets the target on the split itself
    (`level` None), or on at least `level` of `RESAMPLES` bootstrap resamples of it (fixed
    seed: the same samples give the same fit)."""
    n = len(samples)
    if level is None:
        if target_share is not None:
            return [s <= target_share + 1e-12 for s in routes.shares]
        assert target_quality is not None
        return [a >= target_quality * routes.cloud_accuracy - 1e-12 for a in routes.accuracies]
    import numpy as np

    counts = np.random.default_rng(0).multinomial(n, np.full(n, 1 / n), size=RESAMPLES).astype(np.float64)
    edge, cloud = np.array([s.edge_score for s in samples]), np.array([s.cloud_score for s in samples])
    gain = cloud - edge
    order = sorted(range(n), key=lambda i: conf[i])  # as `curve` sends them
    accuracy, sent = counts @ edge, np.zeros(RESAMPLES)  # per resample: total score (edge alone), sent
    cloud_total, done, meets = counts @ cloud, 0, []
    for share in routes.shares:
        k = round(share * n)
        moved = order[done:k]
        accuracy += counts[:, moved] @ gain[moved]
        sent += counts[:, moved].sum(axis=1)
        done = k
        held = sent <= target_share * n + 1e-9 if target_share is not None else accuracy >= target_quality * cloud_total - 1e-9
        meets.append(float(held.mean()) >= level)
    return meets


def fit(base: Policy, samples: Sequence[Sample], target_share: float | None = None,
        target_quality: float | None = None, source: dict[str, Any] | None = None,
        confidence_level: float | None = None) -> Policy:
    """`base` with its strategy's temperature and its threshold fitted on `samples`: the largest
    threshold whose cloud share stays within `target_share`, or the smallest share whose accuracy
    reaches `target_quality` x the cloud's; with `confidence_level`, on that share of bootstrap
    resamples of `samples` rather than on `samples` alone."""
    check_targets(target_share, target_quality, confidence_level)
    strategy = fit_temperature(parse_strategy(base.strategy), samples, base.aggregate, base.first_k)
    conf = confidences(strategy, samples, base.aggregate, base.first_k)
    routes = curve(conf, samples)
    points = list(zip(routes.shares, routes.accuracies, routes.thresholds))
    meets = _meets_target(conf, samples, routes, target_share, target_quality, confidence_level)
    if target_share is not None:
        share, accuracy, threshold = [p for p, ok in zip(points, meets) if ok][-1]  # share 0 always meets
    else:
        share, accuracy, threshold = next((p for p, ok in zip(points, meets) if ok), points[-1])
    fitted = {"samples": len(samples), "target_share": target_share, "target_quality": target_quality,
              **({"confidence_level": confidence_level, "resamples": RESAMPLES} if confidence_level is not None else {}),
              "cloud_share": round(share, 4), "accuracy": round(accuracy, 4), "edge_accuracy": round(routes.edge_accuracy, 4),
              "cloud_accuracy": round(routes.cloud_accuracy, 4), **(source or {})}
    return base.model_copy(update={"strategy": str(strategy), "threshold": min(1.0, threshold), "mode": "route",
                                   "fitted": fitted})


def measure(policy: Policy, samples: Sequence[Sample]) -> dict[str, float]:
    """A fitted policy applied to other samples: the cloud share and accuracy it gives there."""
    conf = confidences(policy.scorer, samples, policy.aggregate, policy.first_k)
    sent = [c < policy.threshold for c in conf]
    accuracy = math.fsum(s.cloud_score if e else s.edge_score for s, e in zip(samples, sent)) / len(samples)
    return {"cloud_share": sum(sent) / len(samples), "accuracy": accuracy}


def calibrate_policy(edge: ModelSpec, edge_backend: str, cloud: CloudSettings | None, base: Policy, task_spec: TaskSpec,
                     target_share: float | None, target_quality: float | None, out: str | Path | None = None,
                     confidence_level: float | None = None) -> Policy:
    """`edgelmm collab calibrate`: the task split answered by the edge alone and the cloud alone
    (through the real path), `base` fitted on it, and the policy written to `out`."""
    from edgelmm.collab.policy import save_policy
    from edgelmm.collab.session import Session
    from edgelmm.tasks import get_task

    if cloud is None:
        raise EdgelmmError("calibration needs the cloud's answers too", "give --cloud URL")
    check_targets(target_share, target_quality, confidence_level)
    if out is not None:
        output_parent(out)
    task = get_task(task_spec)
    samples = task.samples(task_spec.samples or 200, task_spec.seed)
    limit = task_spec.max_new_tokens or task.max_new_tokens or 24
    params = SamplingParams(max_new_tokens=limit)

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with Session(edge, cloud, edge_backend) as session:
            edge_rows = await session.run(samples, task, base.model_copy(update={"mode": "edge"}), params)
            cloud_rows = await session.run(samples, task, base.model_copy(update={"mode": "cloud"}), params, concurrency=4)
            return edge_rows, cloud_rows

    edge_rows, cloud_rows = asyncio.run(both())
    failed = [r for r in cloud_rows if r["served_by"] != "cloud"]
    if failed:
        raise EdgelmmError(f"the cloud did not answer {len(failed)} of {len(cloud_rows)} calibration requests: {failed[0]['reason']}")
    policy = fit(base, samples_from(edge_rows, cloud_rows), target_share, target_quality,
                 {"task": task.label, "seed": task_spec.seed}, confidence_level)
    if out is not None:
        save_policy(policy, out)
    return policy
