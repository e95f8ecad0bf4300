"""Where things are inside a model, so that methods never name a model class.

An adapter wraps a loaded transformers model (and its processor) and answers structural
questions: which modules are the decoder layers, attention, MLP, vision tower and projector,
which positions of a sequence hold image tokens, and how to turn a prompt plus images into the
model's inputs through the model's own processor and chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn


class ModelAdapter:
    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values this adapter serves
    multimodal: ClassVar[bool] = True

    def __init__(self, model: nn.Module, processor: Any | None = None):
        self.model = model
        self.processor = processor

    # ------------------------------------------------------------ structure
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return getattr(self.config, "text_config", None) or self.config

    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm), without the lm_head."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def language_layers(self) -> list[nn.Module]:
        return list(self.language_model().layers)

    def attention(self, i: int) -> nn.Module:
        return self.language_layers()[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.language_layers()[i].mlp

    def embed_tokens(self) -> nn.Module:
        return self.language_model().embed_tokens

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def vision_tower(self) -> nn.Module | None:
        return getattr(self.model.model, "vision_tower", None)

    def projector(self) -> nn.Module | None:
        return getattr(self.model.model, "multi_modal_projector", None)

    # ------------------------------------------------------------ vision side, for token-pruning methods
    def vision_attention(self) -> nn.Module | None:
        """The vision-encoder attention of the layer whose output the projector reads: its map tells
        which patches the encoder relies on (VisionZip-style pruning scores tokens by it)."""
        return None

    @property
    def vision_cls_token(self) -> bool:
        """Whether each vision-encoder sequence starts with a [CLS] token the language model never sees."""
        return False

    def vision_token_map(self, tower_inputs: Mapping[str, Any], n_scored: int) -> torch.Tensor:
        """For each of the `n_scored` tokens that `vision_attention()` attended over (its calls in
        order, batch items flattened), the visual token of the language sequence it feeds, counted
        over the whole batch in sequence order; -1 where it feeds none (a [CLS] token).

        `tower_inputs` are the arguments of that call of `vision_tower()`, by parameter name."""
        raise NotImplementedError(f"the {self.family} adapter does not map vision-encoder tokens to language tokens")

    def take_visual_injections(self, lm_kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Remove from the language model's forward arguments the features it would add onto the
        visual-token positions after its first decoder layers (one [visual tokens, hidden] tensor
        per layer, in layer order) and return them, so that a method that drops visual tokens can
        add them at the positions that remain. Most families add none."""
        return []

    # ------------------------------------------------------------ tokens
    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token_id(self) -> int | None:
        for owner in (self.config, self.processor):
            for key in ("image_token_id", "image_token_index"):
                value = getattr(owner, key, None)
                if isinstance(value, int):
                    return value
        return None

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.BoolTensor:
        """True where the language sequence holds an image (visual) token."""
        token = self.image_token_id
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return sorted(ids)

    # ------------------------------------------------------------ inputs
    def messages(self, prompt: str, images: list[Any]) -> list[dict[str, Any]]:
        """One user turn in the chat-template form the processors expect."""
        if not self.multimodal:
            return [{"role": "user", "content": prompt}]
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    def chat_text(self, prompt: str, images: list[Any]) -> str:
        return self.processor.apply_chat_template(
            self.messages(prompt, images), add_generation_prompt=True, tokenize=False
        )

    def build_inputs(self, prompt: str, images: list[Any]) -> dict[str, torch.Tensor]:
        return self.build_batch([(prompt, images)])

    def build_batch(self, items: list[tuple[str, list[Any]]]) -> dict[str, torch.Tensor]:
        """Model inputs for several prompts at once, left-padded so that generation lines up."""
        texts = [self.chat_text(prompt, images) for prompt, images in items]
        # As transformers' own apply_chat_template(tokenize=True): a tokenizer never adds special
        # tokens to a templated prompt, a processor adds them unless the template starts with BOS.
        bos = self.tokenizer.bos_token
        add_special = self.multimodal and not (bos and texts[0].startswith(bos))
        # padding_side per call, so the tokenizer's own setting (shared with others) stays as it is.
        kwargs = {"return_tensors": "pt", "padding": True, "padding_side": "left", "add_special_tokens": add_special}
        if not self.multimodal:
            return dict(self.tokenizer(texts, **kwargs))
        flat = [image for _, images in items for image in images]
        return dict(self.processor(text=texts, images=flat or None, **kwargs))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, layers={len(self.language_layers())})"


def feature_layer(vision_feature_layer: int | list[int], n_layers: int) -> int:
    """The encoder layer whose output is `hidden_states[vision_feature_layer]` (the last one of a
    list); hidden_states holds the embeddings first, then one entry per layer."""
    layers = vision_feature_layer if isinstance(vision_feature_layer, list) else [vision_feature_layer]
    return max(max(index % (n_layers + 1) for index in layers) - 1, 0)


def sequence_token_map(n_sequences: int, length: int, cls_token: bool) -> torch.Tensor:
    """Vision token -> language visual token for encoders whose every sequence (image or tile) feeds
    its tokens to the language model in order, less a leading [CLS] token."""
    position = torch.arange(length) - int(cls_token)
    index = torch.arange(n_sequences)[:, None] * (length - int(cls_token)) + position
    return index.masked_fill(position < 0, -1).flatten()
