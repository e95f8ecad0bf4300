"""Confidence strategies and their aggregation, on positions whose answers are known by hand."""

from __future__ import annotations

import math

import pytest

from edgelmm.collab.confidence import Ensemble, Entropy, MaxProb, Position, Temperature, TopMass, parse_strategy
from edgelmm.errors import EdgelmmError
from edgelmm.registry import CONFIDENCE

SURE = Position(math.log(0.9), ((1, math.log(0.9)), (2, math.log(0.05)), (3, math.log(0.05))))
FLAT = Position(math.log(0.25), tuple((i, math.log(0.25)) for i in range(4)))


def test_max_prob_and_top_mass():
    assert MaxProb().token(SURE) == pytest.approx(0.9)
    assert TopMass(k=2).token(SURE) == pytest.approx(0.95)
    assert TopMass(k=1).token(FLAT) == pytest.approx(0.25)
    assert MaxProb().token(Position(math.log(0.6))) == pytest.approx(0.6)  # no alternatives: the chosen token


def test_entropy_is_one_when_certain_and_zero_when_uniform():
    certain = Position(0.0, ((1, 0.0),))
    assert Entropy().token(certain) == pytest.approx(1.0)
    uniform = Position(math.log(0.2), tuple((i, math.log(0.2)) for i in range(5)))  # k=5 tokens, no mass left
    assert Entropy().token(uniform) == pytest.approx(1 - math.log(5) / math.log(6))
    assert Entropy().token(FLAT) < Entropy().token(SURE)


def test_temperature_one_is_the_top_k_renormalised_and_higher_temperatures_soften():
    assert Temperature(temperature=1.0).token(SURE) == pytest.approx(0.9)  # the top-3 hold all the mass
    assert Temperature(temperature=2.0).token(SURE) < 0.9 < Temperature(temperature=0.5).token(SURE)
    with pytest.raises(EdgelmmError, match="must be > 0"):
        Temperature(temperature=0)


def test_aggregation_over_the_answer():
    answer = [SURE, FLAT, SURE]
    strategy = MaxProb()
    assert strategy.sequence(answer, "mean") == pytest.approx((0.9 + 0.25 + 0.9) / 3)
    assert strategy.sequence(answer, "min") == pytest.approx(0.25)
    assert strategy.sequence(answer, "first", first_k=1) == pytest.approx(0.9)
    assert strategy.sequence([], "mean") == 0.0  # nothing generated: not confident


def test_ensemble_mixes_answer_confidences():
    ensemble = Ensemble(members=("max_prob", "top_mass(k=2)"), weights=(1.0, 3.0))
    assert ensemble.sequence([SURE]) == pytest.approx((0.9 + 3 * 0.95) / 4)
    warmer = Ensemble(members=("temperature", "entropy")).with_temperature(2.0)
    assert warmer.parts[0] == Temperature(temperature=2.0)
    with pytest.raises(EdgelmmError, match="cannot be an ensemble"):
        Ensemble(members=("ensemble",))
    with pytest.raises(EdgelmmError, match="as many weights"):
        Ensemble(members=("max_prob",), weights=(1.0, 2.0))


def test_specs_and_registry():
    assert parse_strategy("top_mass(k=3)") == TopMass(k=3)
    assert str(Temperature(temperature=1.5)) == "temperature(temperature=1.5)"
    assert str(parse_strategy(str(Ensemble(members=("max_prob", "entropy"))))) == "ensemble"
    with pytest.raises(EdgelmmError, match="unknown confidence strategy 'entropie'.*did you mean 'entropy'"):
        parse_strategy("entropie")
    assert {"max_prob", "entropy", "temperature", "top_mass", "ensemble"} <= set(CONFIDENCE.names())


def test_a_strategy_of_ones_own_plugs_into_policies():
    import dataclasses
    from typing import ClassVar

    from edgelmm.collab.confidence import Strategy
    from edgelmm.collab.policy import Policy

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Margin(Strategy):
        """The gap between the two most likely tokens."""

        name: ClassVar[str] = "margin"

        def token(self, position: Position) -> float:
            lps = sorted(position.top_logprobs, reverse=True) + [-math.inf]
            return math.exp(lps[0]) - math.exp(lps[1])

    CONFIDENCE.register("margin", Margin)
    policy = Policy(strategy="margin", threshold=0.5)
    assert policy.scorer.sequence([SURE]) == pytest.approx(0.85) and not policy.escalates(0.85)
