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

from collections.abc import Mapping
from typing import Any

import torch

from edgelmm.models.architecture import (
    Architecture,
    VisionArch,
    decoder_architecture,
    linear_params,
    merger_params,
    norm_params,
    qwen_geometry,
)
from edgelmm.models.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    planned_types = ("qwen3_vl",)

    def take_visual_injections(self, lm_kwargs: dict[str, Any]) -> list[torch.Tensor]:
        lm_kwargs.pop("visual_pos_masks", None)  # the image-token mask, which the caller has
        return list(lm_kwargs.pop("deepstack_visual_embeds", None) or [])

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config, _vision)


def _vision(config: Any) -> VisionArch:
    v = config.vision_config
    h, i, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    block = 2 * norm_params(h) + linear_params(h, 3 * h) + linear_params(h, h) + linear_params(h, i) + linear_params(i, h)
    # Conv3d with bias, plus a learned position table interpolated to the image grid
    embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h + h + v.num_position_embeddings * h
    tokens, per_token = qwen_geometry(v.patch_size, m)
    # the final merger normalises before merging; each deepstack merger (features of an inner block
    # fed into an early decoder layer) normalises the merged, 4x wider vector
    projector = merger_params(h, m, v.out_hidden_size, norm_params(h)) + len(v.deepstack_visual_indexes) * merger_params(
        h, m, v.out_hidden_size, norm_params(h * m * m)
    )
    return VisionArch(embed + v.depth * block, projector, v.depth, h, i, tokens, per_token)
