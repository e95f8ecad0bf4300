"""When the edge asks the cloud: a routing policy, saved as YAML by `edgelmm collab calibrate`.

    mode: route                  # route | edge (never ask) | cloud (never run the edge) | escalate (always ask)
                                 # | draft_verify (the edge drafts, the cloud verifies: the cloud's output)
    strategy: temperature(temperature=1.8)
    aggregate: mean              # over the answer's tokens: mean | min | first (the first `first_k`)
    threshold: 0.62              # ask the cloud when the edge's confidence is below this
    early_k: null                # decide after the edge's first k tokens instead of its whole answer
    top_logprobs: 5              # alternatives the edge returns per token (entropy, top-k mass)
    draft_length: null           # draft_verify: tokens per round; null adapts it (collab/speculative.py)
    draft_max: 8                 # draft_verify: the adaptive length's ceiling
    protocol: auto               # draft_verify: auto (probe) | native (edgelmm serve) | generic (echo + logprobs)
    draft_when: faster           # draft_verify: faster (an answer is drafted only while that measures faster
                                 # per token than the cloud decoding alone, streamed; the output is the
                                 # cloud's either way) | always
    escalate_by: complete        # route/escalate: how an escalated request is answered: complete (the cloud
                                 # decodes it) | draft_verify (the edge's own tokens are the first drafts)

`--policy` takes such a file or a mode's name (the other fields at their defaults);
`draft-verify` is the same as `draft_verify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from edgelmm.backends.base import Result
from edgelmm.collab.confidence import Strategy, parse_strategy, positions
from edgelmm.config import SamplingParams, Schema, validate
from edgelmm.errors import EdgelmmError
from edgelmm.utils.io import atomic_write_text

MODES = ("route", "edge", "cloud", "escalate", "draft_verify")


class Policy(Schema):
    mode: Literal["route", "edge", "cloud", "escalate", "draft_verify"] = "route"
    strategy: str = "max_prob"
    aggregate: Literal["mean", "min", "first"] = "mean"
    first_k: int = Field(4, ge=1)
    threshold: float = Field(0.9, ge=0.0, le=1.0)
    early_k: int | None = Field(None, ge=1)
    top_logprobs: int = Field(5, ge=1, le=20)
    draft_length: int | None = Field(None, ge=1, le=64)
    draft_max: int = Field(8, ge=1, le=64)
    protocol: Literal["auto", "native", "generic"] = "auto"
    draft_when: Literal["faster", "always"] = "faster"
    escalate_by: Literal["complete", "draft_verify"] = "complete"
    fitted: dict[str, Any] | None = None  # what calibration measured, for the record

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_alias(cls, value: Any) -> Any:
        return "draft_verify" if value == "draft-verify" else value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        try:
            return str(parse_strategy(value))
        except EdgelmmError as exc:
            raise ValueError(str(exc)) from None

    @property
    def scorer(self) -> Strategy:
        return parse_strategy(self.strategy)

    @property
    def verifies(self) -> bool:
        """Whether the policy uses draft-verify (for every request, or for escalated ones)."""
        return self.mode == "draft_verify" or (self.mode in ("route", "escalate") and self.escalate_by == "draft_verify")

    @property
    def runs_edge(self) -> bool:
        return self.mode != "cloud"

    def confidence(self, result: Result, tokens: int | None = None) -> float:
        """The edge answer's confidence (over its first `tokens` tokens when given)."""
        found = positions(result.logprobs, result.top_logprobs)
        return self.scorer.sequence(found[:tokens] if tokens else found, self.aggregate, self.first_k)

    def edge_params(self, params: SamplingParams) -> SamplingParams:
        """`params` asking the edge for what the confidence needs: log-probabilities and top_logprobs alternatives."""
        return params.model_copy(update={"logprobs": True, "top_logprobs": max(params.top_logprobs, self.top_logprobs)})

    def escalates(self, confidence: float | None) -> bool:
        """Whether an edge answer of this confidence goes to the cloud."""
        if self.mode in ("cloud", "escalate", "draft_verify"):
            return True
        if self.mode == "edge":
            return False
        return confidence is None or confidence < self.threshold

    def label(self) -> str:
        if self.mode == "draft_verify":
            return f"draft_verify (k={self.draft_length or f'adaptive<={self.draft_max}'})"
        if self.mode not in ("route", "escalate"):
            return self.mode
        early = f", early_k={self.early_k}" if self.early_k else ""
        verified = f", escalated by draft_verify ({self.protocol})" if self.verifies else ""
        if self.mode == "escalate":
            return "escalate" + verified
        return f"{self.strategy} [{self.aggregate}] < {self.threshold:.3g}{early}{verified}"


def load_policy(source: str | Path | Policy | None) -> Policy:
    """A policy from a YAML/JSON file, a mode's name, or None (the default routing policy)."""
    if source is None or isinstance(source, Policy):
        return source or Policy()
    if str(source).replace("-", "_") in MODES:
        return Policy(mode=str(source).replace("-", "_"))
    path = Path(source)
    if not path.is_file():
        raise EdgelmmError(f"policy '{source}' is neither a file nor a mode", f"give a policy file or one of {', '.join(MODES)}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgelmmError(f"{path}: the policy file does not parse: {str(exc).splitlines()[0]}",
                           "write it as `edgelmm collab calibrate` does (YAML)") from None
    if not isinstance(data, dict):
        raise EdgelmmError(f"{path}: a policy file holds a mapping (mode, strategy, threshold, ...)")
    return validate(Policy, data, str(path))


def save_policy(policy: Policy, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(policy.model_dump(exclude_none=True), sort_keys=False))
