"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): after k decoder layers
have run on the whole sequence, keep the visual tokens the last prompt token attends to most.

The scores are those of decoder layer k-1 (the last full-sequence layer), as in the paper, read
by a probe in that layer's attention while its kernel stays SDPA or flash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from edgelmm.methods.pruning.base import Pruner, VisualTokens


@dataclass(kw_only=True)
class FastV(Pruner):
    name: ClassVar[str] = "fastv"
    uses_lm_attention: ClassVar[bool] = True
    shown: ClassVar[tuple[str, ...]] = ("k",)

    k: int = 2

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return visual.lm_attention
