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

from edgelmm.errors import EdgelmmError
from edgelmm.models.architecture import (
    Architecture,
    VisionArch,
    decoder_architecture,
    linear_params,
    norm_params,
)
from edgelmm.models.base import ModelAdapter, feature_layer, sequence_token_map


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    planned_types = ("llava",)

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

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config, _vision)

    @classmethod
    def saved_key(cls, key: str, config: Any) -> str:
        """`vision_tower.vision_model.*`, as llava-hf checkpoints have it and vLLM's loader needs:
        transformers 5 saves a CLIP/SigLIP tower it built from a config without `vision_model.`
        (its CLIPVisionModel drops that prefix at load and restores it on save only for weights it
        loaded with it); vLLM maps `vision_tower.` onto its own CLIPVisionModel, whose parameters
        all sit under `vision_model`. transformers loads either spelling."""
        vision = config.get("vision_config", {}) if isinstance(config, Mapping) else getattr(config, "vision_config", None)
        kind = vision.get("model_type") if isinstance(vision, Mapping) else getattr(vision, "model_type", None)
        if kind in ("clip_vision_model", "siglip_vision_model") and key.startswith("vision_tower.") \
                and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        return key


def _vision(config: Any) -> VisionArch:
    v, t = config.vision_config, config.get_text_config()
    if v.model_type != "clip_vision_model":
        raise EdgelmmError(f"llava with a '{v.model_type}' vision tower is not known to the planner", "supported: CLIP")
    h, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    block = 4 * linear_params(h, h) + 2 * norm_params(h) + linear_params(h, i) + linear_params(i, h)
    # class token, patch conv (no bias), positions for patches + class token, pre- and post-norm
    encoder = h + v.num_channels * v.patch_size**2 * h + (patches + 1) * h + 2 * norm_params(h)
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    bias = config.multimodal_projector_bias
    projector = linear_params(h * feature_layers, t.hidden_size, bias) + linear_params(t.hidden_size, t.hidden_size, bias)
    tokens = patches + (config.vision_feature_select_strategy == "full")  # "default" drops the class token
    return VisionArch(encoder + v.num_hidden_layers * block, projector, v.num_hidden_layers, h, i, tokens, 1)
