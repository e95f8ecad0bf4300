"""Routing curves, RouteLLM's summary figures and threshold fitting, on samples built by hand."""

from __future__ import annotations

import math

import pytest

from edgelmm.collab import calibrate
from edgelmm.collab.calibrate import Sample, curve
from edgelmm.collab.confidence import MaxProb, Position
from edgelmm.collab.policy import Policy


def sample(p: float, edge: float, cloud: float = 1.0) -> Sample:
    return Sample([Position(math.log(p), ((0, math.log(p)),))], edge, cloud)


# four samples: the two the edge gets wrong are its least confident
SAMPLES = [sample(0.2, 0.0), sample(0.4, 0.0), sample(0.8, 1.0), sample(0.95, 1.0)]


def test_curve_sends_the_least_confident_first():
    routes = curve(calibrate.confidences(MaxProb(), SAMPLES, "mean", 4), SAMPLES)
    assert routes.shares == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert routes.accuracies == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert routes.cpt(0.5) == 0.25 and routes.cpt(0.8) == 0.5
    # PGR 0, .5, 1, 1, 1 over shares in steps of .25: area .0625 + .1875 + .25 + .25
    assert routes.apgr() == pytest.approx(0.75)
    assert routes.share_for_quality(0.97) == 0.5


def test_ties_move_together():
    tied = [sample(0.5, 0.0), sample(0.5, 1.0), sample(0.9, 1.0)]
    routes = curve(calibrate.confidences(MaxProb(), tied, "mean", 4), tied)
    assert routes.shares == [0.0, pytest.approx(2 / 3), 1.0]


def test_fit_for_a_quality_or_a_share_and_measure_elsewhere():
    policy = calibrate.fit(Policy(), SAMPLES, target_quality=1.0)
    assert policy.fitted["cloud_share"] == 0.5 and policy.fitted["accuracy"] == 1.0
    assert policy.threshold == pytest.approx(0.6)
    assert calibrate.measure(policy, SAMPLES) == {"cloud_share": 0.5, "accuracy": 1.0}
    capped = calibrate.fit(Policy(), SAMPLES, target_share=0.3)
    assert capped.fitted["cloud_share"] == 0.25
    other = [sample(0.25, 0.0), sample(0.9, 1.0)]  # the threshold lies half-way between 0.2 and 0.4
    assert calibrate.measure(capped, other) == {"cloud_share": 0.5, "accuracy": 1.0}


def test_temperature_is_fitted_to_predict_correctness():
    # an over-confident edge: 0.99 sure of every answer, right on half of them
    top = ((0, math.log(0.99)), (1, math.log(0.01)))
    over = [Sample([Position(math.log(0.99), top)], float(i % 2), 1.0) for i in range(20)]
    fitted = calibrate.fit_temperature(calibrate.parse_strategy("temperature"), over, "mean", 4)
    assert fitted.temperature == calibrate.TEMPERATURES[-1]  # as soft as the grid allows
    assert calibrate.fit_temperature(MaxProb(), over, "mean", 4) == MaxProb()  # nothing to fit


def test_bad_targets():
    with pytest.raises(Exception, match="exactly one target"):
        calibrate.fit(Policy(), SAMPLES)
    with pytest.raises(Exception, match="outside"):
        calibrate.fit(Policy(), SAMPLES, target_share=1.5)
    with pytest.raises(Exception, match="confidence level 1.0 is outside"):
        calibrate.fit(Policy(), SAMPLES, target_quality=0.97, confidence_level=1.0)


def _split(n: int, seed: int) -> list[Sample]:
    """An edge right 80 % of the time whose confidence tells right from wrong only roughly; the
    cloud right 96 % of the time."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        right = rng.random() < 0.8
        p = min(0.999, max(0.05, rng.gauss(0.8 if right else 0.5, 0.15)))
        out.append(sample(p, float(right), float(rng.random() < 0.96)))
    return out


def test_a_confidence_level_trades_cloud_share_for_a_target_that_holds_on_new_splits():
    calibration, later = _split(400, 0), [_split(400, seed) for seed in range(1, 41)]
    plain = calibrate.fit(Policy(), calibration, target_quality=0.97)
    sure = calibrate.fit(Policy(), calibration, target_quality=0.97, confidence_level=0.9)
    assert sure.fitted["confidence_level"] == 0.9 and "confidence_level" not in plain.fitted
    assert sure.fitted["cloud_share"] > plain.fitted["cloud_share"]

    def held(policy: Policy) -> int:
        return sum(calibrate.measure(policy, s)["accuracy"] >= 0.97 * sum(x.cloud_score for x in s) / len(s) for s in later)

    assert held(plain) <= 24 and held(sure) >= 36  # of 40 later splits (measured: 17 and 39)
    # with a share target, the level keeps the share within it on resamples: a smaller share
    capped, sure_cap = (calibrate.fit(Policy(), calibration, target_share=0.3, confidence_level=level) for level in (None, 0.9))
    assert sure_cap.fitted["cloud_share"] < capped.fitted["cloud_share"] <= 0.3
