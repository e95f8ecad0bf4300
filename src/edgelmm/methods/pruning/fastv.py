"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): after k decoder layers
have run on the whole sequence, keep the visual tokens the last prompt token attends to most.

The scores are those of decoder layer k-1 (the last full-sequence layer), as in the paper, read
by a probe in that layer's attention while its kernel stays SDPA or flash.
"""

from __future__ import annotations

import torch

from edgelmm.methods.pruning.base import Pruner, VisualTokens
from edgelmm.methods.pruning.registry import register_pruner


@register_pruner
class FastV(Pruner):
    name = "fastv"
    uses_lm_attention = True

    def __init__(self, *, k: int = 2, keep: float | None = None, tokens: int | None = None):
        super().__init__(keep=keep, tokens=tokens, k=k)

    def score(self, visual: VisualTokens) -> torch.Tensor:
        return visual.lm_attention
