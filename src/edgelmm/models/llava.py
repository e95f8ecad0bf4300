"""LLaVA (llava-1.5 / llava-hf checkpoints): CLIP vision tower, MLP projector, Llama-family decoder.

transformers 5 keeps all three under `model.model` (`vision_tower`, `multi_modal_projector`,
`language_model`) and expands `<image>` (config.image_token_index) to one token per patch,
which is exactly the base adapter's layout: nothing to override.
"""

from __future__ import annotations

from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
