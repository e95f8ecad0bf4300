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

from edgelmm.models.architecture import (
    Architecture,
    VisionArch,
    decoder_architecture,
    linear_params,
    merger_params,
    norm_params,
    qwen_geometry,
)
from edgelmm.models.base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    planned_types = ("qwen2_vl", "qwen2_5_vl")

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

    def token_fields(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The processor also marks each token's modality (1: image), which M-RoPE reads."""
        return {**super().token_fields(input_ids), "mm_token_type_ids": self.image_token_mask(input_ids).long()}

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config, _qwen2_5_vl if config.get("model_type") == "qwen2_5_vl" else _qwen2_vl)


def _qwen2_vl(config: Any) -> VisionArch:
    v = config.vision_config
    e, i, m = v.embed_dim, int(v.embed_dim * v.mlp_ratio), v.spatial_merge_size
    block = 2 * norm_params(e) + linear_params(e, 3 * e) + linear_params(e, e) + linear_params(e, i) + linear_params(i, e)
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * e  # Conv3d, no bias
    tokens, per_token = qwen_geometry(v.patch_size, m)
    projector = merger_params(e, m, v.hidden_size, norm_params(e))
    return VisionArch(patch_embed + v.depth * block, projector, v.depth, e, i, tokens, per_token)


def _qwen2_5_vl(config: Any) -> VisionArch:
    v = config.vision_config
    h, i, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    # RMSNorms and a gated (SwiGLU) MLP with biases
    block = 2 * norm_params(h, False) + linear_params(h, 3 * h) + linear_params(h, h) + 2 * linear_params(h, i) + linear_params(i, h)
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h
    tokens, per_token = qwen_geometry(v.patch_size, m)
    projector = merger_params(h, m, v.out_hidden_size, norm_params(h, False))
    return VisionArch(patch_embed + v.depth * block, projector, v.depth, h, i, tokens, per_token)
