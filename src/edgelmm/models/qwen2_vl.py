"""Qwen2-VL and Qwen2.5-VL: one adapter, as transformers 5 lays both out alike.

The vision transformer is `model.model.visual` and ends in its own patch merger (2x2 patches
to one language token), which plays the projector's part; there is no separate projector
module. Images become runs of `<|image_pad|>` (config.image_token_id), one per merged patch.

Inside the tower each image is one attention sequence of patches, ordered so that every run of
spatial_merge_size**2 patches is one merged token; Qwen2.5-VL further permutes those runs window
by window and restores the order after the merger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import register_adapter


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def vision_attention(self) -> nn.Module:
        return self.vision_tower().blocks[-1].attn

    def vision_token_map(self, tower_inputs: Mapping[str, Any], n_scored: int) -> torch.Tensor:
        visual = self.vision_tower()
        merged = torch.arange(n_scored) // visual.spatial_merge_size**2
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: runs are in window order inside the tower
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                tower_inputs["grid_thw"], spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size, patch_size=visual.patch_size, kwargs={},
            )
            merged = window_index.cpu()[merged]
        return merged
