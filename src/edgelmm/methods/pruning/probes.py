"""Attention scores read inside one attention module, while every kernel stays the model's own.

Asking transformers for attention weights switches a model to eager attention everywhere. A
pruning method needs the scores of one module only (the last prompt token at one decoder layer,
or one vision-encoder layer), so a probe gives just that module a private copy of its config
whose attention implementation is `edgelmm_probe`: a function registered with transformers'
AttentionInterface that receives the module's query and key — already projected, normalised and
rotated, whatever the family — hands them to an observer, then runs the implementation the model
was loaded with (SDPA, flash, eager) on the same arguments. Every other module is untouched.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from edgelmm.errors import EdgelmmError

PROBE_IMPLEMENTATION = "edgelmm_probe"
# query [B, H, q, D], key [B, Hkv, kv, D], the mask the module passes, the softmax scale
Observer = Callable[[torch.Tensor, torch.Tensor, Any, float], None]

_PROBES: weakref.WeakKeyDictionary[nn.Module, AttentionProbe] = weakref.WeakKeyDictionary()


class AttentionProbe:
    """Observe one attention module's query and key on every call, until `remove()`."""

    def __init__(self, module: nn.Module, observe: Observer):
        if module in _PROBES:
            raise EdgelmmError(f"{type(module).__name__} already has an attention probe", "remove the other pruning first")
        self.module = module
        self.observe = observe
        self.config = module.config
        probed = copy.copy(module.config)
        probed._attn_implementation_internal = PROBE_IMPLEMENTATION  # this copy only: no sub-config propagation
        module.config = probed
        _PROBES[module] = self

    def attention(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
        """What the module would call without the probe; looked up per call, so a later change
        of the model's attention implementation is followed."""
        source = sys.modules[type(self.module).__module__]
        return source.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, source.eager_attention_forward)

    def remove(self) -> None:
        self.module.config = self.config
        _PROBES.pop(self.module, None)


def _probed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    probe = _PROBES[module]
    scaling = kwargs.get("scaling")
    probe.observe(query, key, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling)
    return probe.attention()(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PROBE_IMPLEMENTATION, _probed_attention)


def _mask_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a boolean (True = attend) or additive mask that broadcasts against `logits`."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def last_query_attention(query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> torch.Tensor:
    """[B, kv] attention of the last query over all keys, softmax per head, mean over heads.

    One query row per head: the cost is a matrix-vector product per layer, nothing like the
    [q, kv] map eager attention would build. Grouped-query heads are matched to their key head
    as transformers' repeat_kv does (query head h reads key head h // group)."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    q = query[:, :, -1, :].reshape(batch, kv_heads, heads // kv_heads, dim).float()
    logits = torch.matmul(q, key.float().transpose(-1, -2)).reshape(batch, heads, length) * scaling
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 4:  # [B, 1 or H, q, kv]: the last query's row
            mask = mask[:, :, -1, :length]
        elif mask.dim() == 2:  # flash attention's padding mask [B, kv], 1 = attend
            mask = mask[:, None, :length].bool()
        logits = _mask_logits(logits, mask)
    return torch.softmax(logits, dim=-1).mean(dim=1)


def vision_attention(query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, cls_only: bool,
                     chunk: int = 1024) -> torch.Tensor:
    """[b, L] attention each token receives in a vision-encoder layer, mean over heads: from the
    [CLS] query alone (`cls_only`), or averaged over all queries, in query chunks so that the
    [L, L] map of a large image is never held whole."""
    heads = query.shape[1]
    k = key.float().repeat_interleave(heads // key.shape[1], dim=1).transpose(-1, -2)
    mask = mask if isinstance(mask, torch.Tensor) else None
    queries = query[:, :, :1] if cls_only else query
    total = torch.zeros(query.shape[0], heads, key.shape[2], device=query.device)
    for start in range(0, queries.shape[2], chunk):
        logits = torch.matmul(queries[:, :, start : start + chunk].float(), k) * scaling
        rows = None if mask is None else mask[:, :, start : start + logits.shape[2], : key.shape[2]]
        total += torch.softmax(_mask_logits(logits, rows), dim=-1).sum(dim=2)
    return (total / queries.shape[2]).mean(dim=1)
