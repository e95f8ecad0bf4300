"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning"): keep the
most diverse visual tokens, not the most attended ones — a max-min diversity subset of the
tokens' features, picked greedily (farthest-point sampling on cosine distance, starting from the
token farthest from its nearest neighbour). Redundant tokens (a uniform background, repeated
texture) collapse to a few representatives; distinct objects keep theirs.

With `merge=True` every dropped token is also merged into its nearest kept token (their mean),
and attention weighs a kept token by the number of tokens it stands for (ToMe's proportional
attention): the background keeps its share of attention instead of vanishing. The paper's
method is `merge=False, k=0` (the projected image features, before the language model).
"""

from __future__ import annotations

from typing import Any

import torch

from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens
from edgelmm.methods.pruning.registry import register_pruner


def farthest_points(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """[n_keep] indices of a max-min diverse subset of unit-norm `features` [n, d], greedily.

    Runs on the features' device without host synchronisation (one small step per kept token)."""
    distance = 1 - features @ features.T
    isolation = distance.topk(2, dim=0, largest=False).values[1]  # distance to the nearest other token
    chosen = torch.empty(n_keep, dtype=torch.long, device=features.device)
    chosen[0] = isolation.argmax()
    nearest = distance[chosen[0]].clone()  # each token's distance to the chosen set
    for i in range(1, n_keep):
        nearest[chosen[i - 1]] = -1.0  # never pick a chosen token again
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, distance[chosen[i]])
    return chosen


@register_pruner
class DivPrune(Pruner):
    name = "divprune"

    def __init__(self, *, keep: float | None = None, tokens: int | None = None, k: int = 0, merge: bool = False):
        super().__init__(keep=keep, tokens=tokens, k=k)
        if not isinstance(merge, bool):
            raise self.error(f"merge must be True or False, got {merge!r}")
        self.merge = merge
        self.proportional = merge

    def select(self, visual: VisualTokens, n_keep: int) -> Selection:
        features = torch.nn.functional.normalize(visual.hidden.float(), dim=-1)
        if n_keep == len(visual):
            return Selection(torch.arange(n_keep, device=features.device))
        keep = farthest_points(features, n_keep)
        if not self.merge:
            return Selection(keep)
        merge_into = (features @ features[keep].T).argmax(dim=1)  # nearest kept token, by cosine
        merge_into[keep] = torch.arange(n_keep, device=keep.device)  # a kept token is its own
        return Selection(keep, merge_into)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "merge": self.merge}
