"""Qwen3-VL and Qwen3-VL-MoE: the Qwen2-VL layout (`model.model.visual`, its `merger`,
`<|image_pad|>` tokens), with 16-pixel patches and, in the MoE variant, sparse MoE blocks as
each decoder layer's `mlp`.

Unlike Qwen2-VL, Qwen3-VL also adds "deepstack" features — intermediate vision layers, each
through its own merger in `visual.deepstack_merger_list` — onto the image-token positions of
the first decoder layers. `projector()` is the final merger only; a method that removes
visual tokens before those layers have run takes the deepstack inputs over through
`take_visual_injections` and adds them at the visual tokens that remain.
"""

from __future__ import annotations

from typing import Any

import torch

from edgelmm.models.qwen2_vl import Qwen2VLAdapter
from edgelmm.models.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def take_visual_injections(self, lm_kwargs: dict[str, Any]) -> list[torch.Tensor]:
        lm_kwargs.pop("visual_pos_masks", None)  # the image-token mask, which the caller has
        return list(lm_kwargs.pop("deepstack_visual_embeds", None) or [])
