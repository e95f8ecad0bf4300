"""The `random` baseline: keep a uniformly random subset of each request's visual tokens.

One generator, seeded once, serves every request in turn: a run is reproducible and requests
still get different subsets.
"""

from __future__ import annotations

import torch

from edgelmm.methods.pruning.base import Pruner, VisualTokens
from edgelmm.methods.pruning.registry import register_pruner


@register_pruner
class RandomTokens(Pruner):
    name = "random"

    def __init__(self, *, keep: float | None = None, tokens: int | None = None, k: int = 0, seed: int = 0):
        super().__init__(keep=keep, tokens=tokens, k=k)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return torch.rand(len(visual), generator=self.generator)

    def params(self) -> dict:
        return {**super().params(), "seed": self.seed}
