"""InternVL (transformers-native `InternVLForConditionalGeneration`, the "-hf" checkpoints).

InternViT is `model.model.vision_tower`, the pixel-shuffle + MLP projector is
`model.model.multi_modal_projector`, the decoder (Qwen2 or Llama) is `language_model`, as in
the base adapter. Each image becomes `<img>` + image_seq_length `<IMG_CONTEXT>` tokens per tile
+ `</img>`; only `<IMG_CONTEXT>` (config.image_token_id) carries visual features, so the
image-token mask leaves the two markers out. Checkpoints in OpenGVLab's remote-code format
(model_type "internvl_chat") are a different model class and are not served here.
"""

from __future__ import annotations

from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import register_adapter


@register_adapter
class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
