"""LLaVA (llava-1.5 / llava-hf checkpoints): CLIP vision tower, MLP projector, Llama-family decoder.

transformers 5 keeps all three under `model.model` (`vision_tower`, `multi_modal_projector`,
`language_model`) and expands `<image>` (config.image_token_index) to one token per patch,
which is exactly the base adapter's layout. Each image is one vision-encoder sequence whose
patches, less [CLS] under the "default" feature strategy, become its visual tokens in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edgelmm.models.base import ModelAdapter, feature_layer, sequence_token_map
from edgelmm.models.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)

    def vision_attention(self) -> nn.Module:
        tower = self.vision_tower()
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[feature_layer(self.config.vision_feature_layer, len(layers))].self_attn

    @property
    def vision_cls_token(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    def vision_token_map(self, tower_inputs: Mapping[str, Any], n_scored: int) -> torch.Tensor:
        n_images = tower_inputs["pixel_values"].shape[0]
        return sequence_token_map(n_images, n_scored // n_images, self.vision_cls_token)
