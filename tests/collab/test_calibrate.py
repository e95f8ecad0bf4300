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
