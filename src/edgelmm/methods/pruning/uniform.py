"""The `uniform` baseline: keep visual tokens evenly spaced over each request's visual tokens,
in the raster order the model reads them (several images share the budget by their sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from edgelmm.methods.pruning.base import Pruner, VisualTokens


@dataclass(kw_only=True)
class Uniform(Pruner):
    name: ClassVar[str] = "uniform"

    def select(self, visual: VisualTokens, n_keep: int) -> torch.Tensor:
        """The middle token of each of `n_keep` equal stretches."""
        return ((torch.arange(n_keep) + 0.5) * len(visual) / n_keep).long()
