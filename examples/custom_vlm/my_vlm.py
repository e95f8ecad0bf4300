"""A VLM of the user's own, onboarded onto edgelmm from outside the package.

Its vision encoder, projector and forward are its own code below; its language model is a
transformers `LlamaModel`; its checkpoints name weights as the user's training code did (the
language model in Meta's original Llama names), which `CHECKPOINT_NAMES` maps onto the modules.
Importing this module is all it takes (`edgelmm --plugin examples/custom_vlm/my_vlm.py ...`, or
`edgelmm.load_plugin(...)`, or an entry point in the group `edgelmm.plugins` of the user's own
package):

- transformers learns the model type (`AutoConfig.register`, `AutoModelForImageTextToText.register`),
  so `from_pretrained` builds it, with `key_mapping` renaming the checkpoint's weights;
- edgelmm learns where things are inside it (`MyVLMAdapter`, registered by family), which is all
  that pruning, quantization, the backends, `bench`, `serve` and `plan` need.

The processor is transformers' own `LlavaProcessor` (its files are in the checkpoint): it expands
`<image>` into one token per patch, which is how this model reads images too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationMixin,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from edgelmm.models.architecture import Architecture, VisionArch, decoder_architecture
from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import register_adapter

# Checkpoint weight name -> module name (regular expressions, as transformers' key_mapping).
CHECKPOINT_NAMES = {
    r"^llm\.tok_embeddings\.": "language_model.embed_tokens.",
    r"^llm\.layers\.(\d+)\.attention\.wq\.": r"language_model.layers.\1.self_attn.q_proj.",
    r"^llm\.layers\.(\d+)\.attention\.wk\.": r"language_model.layers.\1.self_attn.k_proj.",
    r"^llm\.layers\.(\d+)\.attention\.wv\.": r"language_model.layers.\1.self_attn.v_proj.",
    r"^llm\.layers\.(\d+)\.attention\.wo\.": r"language_model.layers.\1.self_attn.o_proj.",
    r"^llm\.layers\.(\d+)\.feed_forward\.w1\.": r"language_model.layers.\1.mlp.gate_proj.",
    r"^llm\.layers\.(\d+)\.feed_forward\.w3\.": r"language_model.layers.\1.mlp.up_proj.",
    r"^llm\.layers\.(\d+)\.feed_forward\.w2\.": r"language_model.layers.\1.mlp.down_proj.",
    r"^llm\.layers\.(\d+)\.attention_norm\.": r"language_model.layers.\1.input_layernorm.",
    r"^llm\.layers\.(\d+)\.ffn_norm\.": r"language_model.layers.\1.post_attention_layernorm.",
    r"^llm\.norm\.": "language_model.norm.",
    r"^output\.": "lm_head.",
    r"^mm_projector\.0\.": "projector.fc1.",
    r"^mm_projector\.2\.": "projector.fc2.",
}
# what transformers calls the KV cache in model outputs ("past_key_values" before 5.2x, "cache" after)
CACHE_FIELD = next(f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in ("cache", "past_key_values"))
VISION_DEFAULTS = {"image_size": 96, "patch_size": 8, "channels": 3, "hidden": 128, "layers": 3, "heads": 4, "mlp": 512,
                   "eps": 1e-5}


class MyVLMConfig(PretrainedConfig):
    model_type = "my_vlm"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, vision: dict[str, Any] | None = None, text_config: Any = None, image_token_id: int = 3, **kwargs: Any):
        self.vision = {**VISION_DEFAULTS, **(vision or {})}
        self.text_config = LlamaConfig(**text_config) if isinstance(text_config, dict) else text_config or LlamaConfig()
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a quick-GELU MLP."""

    def __init__(self, hidden: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)
        self.q, self.k, self.v, self.proj = (nn.Linear(hidden, hidden) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, hidden))
        h = self.fc1(self.norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class VisionEncoder(nn.Module):
    """Patches + a class token + learned positions, pre-norm, blocks; the patch features out."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        patches = (c["image_size"] // c["patch_size"]) ** 2
        self.patch_embed = nn.Conv2d(c["channels"], c["hidden"], c["patch_size"], stride=c["patch_size"], bias=False)
        self.cls_token = nn.Parameter(torch.zeros(c["hidden"]))
        self.pos_embed = nn.Parameter(torch.zeros(patches + 1, c["hidden"]))
        self.norm_pre = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.blocks = nn.ModuleList(Block(c["hidden"], c["heads"], c["mlp"], c["eps"]) for _ in range(c["layers"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # the class token is the encoder's own


class Projector(nn.Module):
    def __init__(self, vision: int, text: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(vision, text), nn.Linear(text, text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MyVLM(PreTrainedModel, GenerationMixin):
    config_class = MyVLMConfig
    base_model_prefix = ""
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer", "Block"]

    def __init__(self, config: MyVLMConfig):
        super().__init__(config)
        self.vision = VisionEncoder(config.vision)
        self.projector = Projector(config.vision["hidden"], config.text_config.hidden_size)
        self.language_model = LlamaModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:  # the prefill: image features replace the image tokens' embeddings
            features = self.projector(self.vision(pixel_values.to(inputs_embeds.dtype)))
            image = (input_ids == self.config.image_token_id)[..., None].expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image, features.to(inputs_embeds.dtype))
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), **{CACHE_FIELD: out[CACHE_FIELD]})


class MyVLMAdapter(ModelAdapter):
    """Where things are in MyVLM; the rest (image tokens, inputs, decoding) is the base adapter's."""

    family = "my_vlm"
    model_types = ("my_vlm",)
    planned_types = ("my_vlm",)
    key_mapping = CHECKPOINT_NAMES

    def language_model(self) -> nn.Module:
        return self.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.vision

    def projector(self) -> nn.Module:
        return self.model.projector

    @classmethod
    def architecture(cls, config: Mapping[str, Any]) -> Architecture:
        return decoder_architecture(config, _vision_sizes)


def _vision_sizes(config: MyVLMConfig) -> VisionArch:
    c, text = config.vision, config.text_config.hidden_size
    h, m, patches = c["hidden"], c["mlp"], (c["image_size"] // c["patch_size"]) ** 2
    block = 4 * (h * h + h) + 2 * 2 * h + (h * m + m) + (m * h + h)
    encoder = c["channels"] * c["patch_size"] ** 2 * h + h + (patches + 1) * h + 2 * h + c["layers"] * block
    projector = (h * text + text) + (text * text + text)
    return VisionArch(encoder, projector, c["layers"], h, m, patches, 1)


AutoConfig.register("my_vlm", MyVLMConfig)
AutoModelForImageTextToText.register(MyVLMConfig, MyVLM)
register_adapter(MyVLMAdapter)
