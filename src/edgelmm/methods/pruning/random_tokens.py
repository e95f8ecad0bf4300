"""The `random` baseline: keep a uniformly random subset of each request's visual tokens.

One generator, seeded once, serves every request in turn: a run is reproducible and requests
still get different subsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from edgelmm.methods.pruning.base import Pruner, VisualTokens


@dataclass(kw_only=True)
class RandomTokens(Pruner):
    name: ClassVar[str] = "random"

    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise self.error(f"seed must be a whole number >= 0, got {self.seed!r}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return torch.rand(len(visual), generator=self.generator)
