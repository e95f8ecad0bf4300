"""Plain decoder-only language models loaded with `AutoModelForCausalLM`.

All the families listed share the `model.model.layers[i].self_attn / .mlp` layout in
transformers 5 (for MoE families `.mlp` is the sparse expert block), so one adapter serves
them; they have no vision side and no image tokens, and their tokenizer is the processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from edgelmm.models.architecture import Architecture, decoder_architecture
from edgelmm.models.base import ModelAdapter


class CausalLMAdapter(ModelAdapter):
    family = "causal_lm"
    multimodal = False
    model_types = (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "smollm3", "starcoder2",
    )
    planned_types = ("llama", "qwen2", "qwen3")

    def vision_tower(self) -> nn.Module | None:
        return None

    def projector(self) -> nn.Module | None:
        return None

    @property
    def image_token_id(self) -> int | None:
        return None

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config)
