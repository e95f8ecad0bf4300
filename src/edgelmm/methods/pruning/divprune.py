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

from dataclasses import dataclass
from typing import ClassVar

import torch

from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens


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


@dataclass(kw_only=True)
class DivPrune(Pruner):
    name: ClassVar[str] = "divprune"

    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.merge, bool):
            raise self.error(f"merge must be True or False, got {self.merge!r}")

    @property
    def proportional_attention(self) -> bool:
        return self.merge

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
