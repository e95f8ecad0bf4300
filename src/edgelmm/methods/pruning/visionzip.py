"""VisionZip (Yang et al., 2024, "Longer is Better but Not Necessary"): select before the language
model. Dominant tokens are the ones the vision encoder attends to most; the rest are merged into
a few context tokens, so that what they showed is summarised rather than lost.

Scores come from the attention of the vision-encoder layer whose output the projector reads: the
[CLS] query's, where the encoder has one, else the attention every token receives averaged over
all queries (Qwen-VL towers). Context tokens: evenly spaced picks among the remaining tokens, each
absorbing the remaining tokens most similar to it (cosine of the projected features), as their
mean; it keeps its own position, so M-RoPE sees it where one of its members was. With
`proportional=True` (not in the paper) a context token weighs in attention as the tokens it
stands for, as in ToMe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens

QUERIES = {"auto", "cls", "all"}


@dataclass(kw_only=True)
class VisionZip(Pruner):
    name: ClassVar[str] = "visionzip"
    uses_vision_attention: ClassVar[bool] = True

    k: int = field(default=0, init=False)  # VisionZip selects before the language model
    context: float = 0.15
    by: str = "auto"
    proportional: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        context = self.context
        if isinstance(context, bool) or not isinstance(context, int | float) or not 0 <= context < 1:
            raise self.error(f"context must be the share of kept tokens that are merged tokens, in [0, 1), got {context!r}")
        if self.by not in QUERIES:
            raise self.error(f"by must be one of {', '.join(sorted(QUERIES))}, got {self.by!r}")
        if not isinstance(self.proportional, bool):
            raise self.error(f"proportional must be True or False, got {self.proportional!r}")
        self.context = float(context)

    @property
    def proportional_attention(self) -> bool:
        return self.proportional

    def vision_queries(self, adapter: Any) -> str:
        if self.by == "cls" and not adapter.vision_cls_token:
            raise self.error(
                f"by='cls', but the {adapter.family} vision encoder has no [CLS] token", "use by='all' or 'auto'"
            )
        return super().vision_queries(adapter) if self.by == "auto" else self.by

    def select(self, visual: VisualTokens, n_keep: int) -> Selection:
        n_context = min(round(self.context * n_keep), n_keep - 1, len(visual) - n_keep)
        dominant = torch.topk(visual.vision_attention.float(), n_keep - n_context).indices
        if n_context <= 0:
            return Selection(dominant)
        rest = torch.ones(len(visual), dtype=torch.bool, device=dominant.device)
        rest[dominant] = False
        rest = rest.nonzero()[:, 0]
        targets = rest[((torch.arange(n_context, device=rest.device) + 0.5) * len(rest) / n_context).long()]
        features = torch.nn.functional.normalize(visual.hidden.float(), dim=-1)
        nearest = (features[rest] @ features[targets].T).argmax(dim=1)
        merge_into = torch.full((len(visual),), -1, dtype=torch.long, device=dominant.device)
        merge_into[rest] = nearest + dominant.numel()  # entries of keep: dominant first, then targets
        merge_into[targets] = torch.arange(n_context, device=rest.device) + dominant.numel()  # a target is its own
        return Selection(torch.cat([dominant, targets]), merge_into)
