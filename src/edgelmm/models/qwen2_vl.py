"""Qwen2-VL and Qwen2.5-VL: one adapter, as transformers 5 lays both out alike.

The vision transformer is `model.model.visual` and ends in its own patch merger (2x2 patches
to one language token), which plays the projector's part; there is no separate projector
module. Images become runs of `<|image_pad|>` (config.image_token_id), one per merged patch.
"""

from __future__ import annotations

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
