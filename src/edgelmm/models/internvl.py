"""InternVL (transformers-native `InternVLForConditionalGeneration`, the "-hf" checkpoints).

InternViT is `model.model.vision_tower`, the pixel-shuffle + MLP projector is
`model.model.multi_modal_projector`, the decoder (Qwen2 or Llama) is `language_model`, as in
the base adapter. Each image becomes `<img>` + image_seq_length `<IMG_CONTEXT>` tokens per tile
+ `</img>`; only `<IMG_CONTEXT>` (config.image_token_id) carries visual features, so the
image-token mask leaves the two markers out. Checkpoints in OpenGVLab's remote-code format
(model_type "internvl_chat") are a different model class and are not served here.

Every tile is one vision-encoder sequence ([CLS] first); pixel shuffle then folds each 2x2 block
of patches into one visual token, so a visual token is fed by four patches that are not
neighbours in the encoder's order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edgelmm.models.architecture import (
    Architecture,
    VisionArch,
    decoder_architecture,
    linear_params,
    norm_params,
)
from edgelmm.models.base import ModelAdapter, feature_layer


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    planned_types = ("internvl",)

    def vision_attention(self) -> nn.Module:
        layers = self.vision_tower().encoder.layer
        return layers[feature_layer(self.config.vision_feature_layer, len(layers))].attention

    @property
    def vision_cls_token(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    def vision_token_map(self, tower_inputs: Mapping[str, Any], n_scored: int) -> torch.Tensor:
        """Traced through the model's own pixel shuffle: patch indices go in as a one-channel
        image, and each output token's channels name the patches it was made of."""
        n_tiles = tower_inputs["pixel_values"].shape[0]
        cls = int(self.vision_cls_token)
        side = math.isqrt(n_scored // n_tiles - cls)
        grid = torch.arange(side * side).view(1, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.config.downsample_ratio)
        groups = shuffled.reshape(-1, shuffled.shape[-1])  # [visual tokens of a tile, patches each]
        tokens, per_token = groups.shape
        tile = torch.empty(side * side, dtype=torch.long)
        tile[groups.flatten()] = torch.arange(tokens).repeat_interleave(per_token)
        index = torch.arange(n_tiles)[:, None] * tokens + tile
        if cls:
            index = torch.cat([torch.full((n_tiles, 1), -1), index], dim=1)
        return index.flatten()

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config, _vision)


def _vision(config: Any) -> VisionArch:
    v, t = config.vision_config, config.get_text_config()
    h, i = v.hidden_size, v.intermediate_size
    (image_h, image_w), (patch_h, patch_w) = v.image_size, v.patch_size
    patches = (image_h // patch_h) * (image_w // patch_w)
    block = (
        3 * linear_params(h, h, v.attention_bias)
        + linear_params(h, h)  # output projection always has a bias
        + 2 * h * v.use_qk_norm  # RMSNorm over the whole width
        + 2 * norm_params(h, v.norm_type == "layer_norm")
        + linear_params(h, i)
        + linear_params(i, h)
        + 2 * h  # layer-scale vectors lambda_1, lambda_2
    )
    encoder = (
        h * (1 + v.use_mask_token)  # class token (+ mask token)
        + linear_params(v.num_channels * patch_h * patch_w, h)  # patch conv with bias
        + (patches + 1) * h * v.use_absolute_position_embeddings
        + (0 if v.use_mean_pooling else norm_params(h))
    )
    shuffle = int(1 / config.downsample_ratio) ** 2  # pixel shuffle folds shuffle patches into one token
    wide = h * shuffle
    projector = norm_params(wide) + linear_params(wide, t.hidden_size) + linear_params(t.hidden_size, t.hidden_size)
    n = v.num_hidden_layers
    return VisionArch(encoder + n * block, projector, n, h, i, patches // shuffle, shuffle)
