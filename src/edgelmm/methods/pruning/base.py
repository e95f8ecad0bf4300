"""What a pruning method is: a rule that picks which visual tokens of one request to keep.

A method sees one request's visual tokens at the decoder layer where it prunes (`VisualTokens`:
positions, hidden states and, when it asks for them, attention scores) and answers with the
ones to keep (`Selection`). Everything else — finding the image tokens, computing attention
scores without giving up fast attention kernels, cutting the sequence, the masks, the rotary
positions and the KV cache, batching — is the runtime's (`edgelmm.methods.pruning.runtime`), so
a new method is a subclass with a `score` or a `select`, nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from edgelmm.errors import EdgelmmError
from edgelmm.methods.base import Method


@dataclass
class VisualTokens:
    """One request's visual tokens entering the pruning layer; entry i of every tensor is the i-th
    visual token in sequence order."""

    positions: torch.Tensor  # [n] index in the prompt sequence (left padding included)
    hidden: torch.Tensor  # [n, hidden] hidden states entering the layer (the input embeddings at layer 0)
    lm_attention: torch.Tensor | None = None  # [n] the last prompt token's attention at layer k-1, mean over heads
    vision_attention: torch.Tensor | None = None  # [n] vision-encoder attention the token's patches receive
    row: int = 0  # the request's row in the batch

    def __len__(self) -> int:
        return self.positions.numel()


@dataclass
class Selection:
    """The visual tokens a method keeps, and optionally how the dropped ones merge into kept ones.

    keep: [m] indices into the request's visual tokens, distinct, in any order.
    merge_into: [n] for every visual token, the entry of `keep` (0..m-1) whose embedding becomes
    the mean of all tokens mapped to it, or -1 for a token that is simply dropped. Kept tokens
    that absorb nothing may map to themselves or to -1 alike: a token alone stays bit-identical.
    """

    keep: torch.Tensor
    merge_into: torch.Tensor | None = None


@dataclass(kw_only=True)
class Pruner(Method):
    """A visual-token pruning method: how many tokens to keep, where, and which.

    keep: share of each request's visual tokens to keep, in (0, 1]; or tokens: how many to keep
    (neither: keep half). k: the decoder layer before which tokens are dropped; 0 prunes the
    language model's input. Subclasses set `name`, the scores they need (`uses_lm_attention`:
    attention of the last prompt token at layer k-1; `uses_vision_attention`: the vision
    encoder's), and implement `score` (the top-scored tokens are kept) or `select`.
    """

    name: ClassVar[str] = "pruner"
    runner: ClassVar[str] = "edgelmm.methods.pruning.runtime:prune"
    uses_lm_attention: ClassVar[bool] = False
    uses_vision_attention: ClassVar[bool] = False

    k: int = 0
    keep: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        keep, tokens, k = self.keep, self.tokens, self.k
        if keep is not None and tokens is not None:
            raise self.error(f"keep={keep} and tokens={tokens} both given", "give the share to keep or the count, not both")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1):
            raise self.error(
                f"keep must be a share of the visual tokens in (0, 1], got {keep!r}", "e.g. keep=0.25 keeps a quarter"
            )
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise self.error(f"tokens must be a whole number of visual tokens >= 1, got {tokens!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise self.error(f"k must be a decoder-layer index >= 0, got {k!r}")
        if keep is not None:
            self.keep = float(keep)

    @property
    def proportional_attention(self) -> bool:
        """Whether merged tokens weigh in attention as the tokens they stand for (ToMe)."""
        return False

    @property
    def share(self) -> float:
        """The share of visual tokens kept when no count is given (half by default)."""
        return 0.5 if self.keep is None else self.keep

    # ------------------------------------------------------------ what a method defines
    def score(self, visual: VisualTokens) -> torch.Tensor:
        """[n] importance of each visual token; the `n_keep` highest are kept."""
        raise NotImplementedError(f"{type(self).__name__} defines neither score() nor select()")

    def select(self, visual: VisualTokens, n_keep: int) -> Selection | torch.Tensor:
        """The tokens to keep (a Selection, or just the indices of `keep`)."""
        return torch.topk(self.score(visual).float(), n_keep, sorted=False).indices

    def vision_queries(self, adapter: Any) -> str:
        """Whose attention scores the visual tokens in the vision encoder (`uses_vision_attention`):
        "cls" (the [CLS] query, where the encoder has one) or "all" (every query, averaged)."""
        return "cls" if adapter.vision_cls_token else "all"

    # ------------------------------------------------------------ shared rules
    def n_keep(self, n: int) -> int:
        """How many of a request's `n` visual tokens stay: the share, rounded half up, at least one."""
        if self.tokens is not None:
            return min(self.tokens, n)
        return min(n, max(1, math.floor(self.share * n + 0.5)))

    def check_model(self, n_layers: int) -> None:
        """Errors that need the model: the layer index against the decoder depth."""
        if self.k >= n_layers:
            raise self.error(
                f"k={self.k} is beyond the model's {n_layers} decoder layers",
                f"choose k between {int(self.uses_lm_attention)} and {n_layers - 1}",
            )
        if self.uses_lm_attention and self.k < 1:
            raise self.error(
                "k must be >= 1: tokens are ranked by the attention of decoder layer k-1",
                "e.g. k=2 ranks after two full-sequence layers, as in the FastV paper",
            )

    def error(self, what: str, hint: str | None = None) -> EdgelmmError:
        return EdgelmmError(f"pruning method '{self.name}': {what}", hint)
