"""Where things are inside a model, so that methods never name a model class.

An adapter wraps a loaded transformers model (and its processor) and answers structural
questions: which modules are the decoder layers, attention, MLP, vision tower and projector,
which positions of a sequence hold image tokens, and how to turn a request (messages, text or
token ids, with images) into the model's inputs through the model's own processor and chat
template. Its classmethods hold the rest of what edgelmm knows about a family: how to load it
(`load_model`, `load_processor`, `key_mapping` for checkpoints with their own weight names)
and how big it is (`architecture`, for `edgelmm plan`). A new family — a user's own VLM
included — is one adapter class registered in `edgelmm.registry.MODEL_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edgelmm.errors import EdgelmmError, RequestError
from edgelmm.models.architecture import Architecture
from edgelmm.request import Request


class ModelAdapter:
    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values this adapter serves
    multimodal: ClassVar[bool] = True
    # Checkpoint weight name -> model weight name, as regular expressions (transformers' key_mapping),
    # for checkpoints saved under other names than the model's modules.
    key_mapping: ClassVar[dict[str, str] | None] = None
    planned_types: ClassVar[tuple[str, ...]] = ()  # the model_types `architecture` sizes (edgelmm plan)

    def __init__(self, model: nn.Module | Any, processor: Any | None = None):
        # navigated by attribute: each family's own module tree; where only inputs are built (the
        # onnx backend), any object with the model's `config` and `generation_config`
        self.model: Any = model
        self.processor: Any = processor

    # ------------------------------------------------------------ structure
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return getattr(self.config, "text_config", None) or self.config

    def language_model(self) -> Any:
        """The decoder stack (embeddings, layers, final norm), without the lm_head."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def language_layers(self) -> list[Any]:
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

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
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
    def hf_messages(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """A request's messages in the form chat templates read (images as {"type": "image"}
        placeholders where they are), and the images in that order. A text-only model's template
        gets plain strings. "developer" turns are system turns, as OpenAI defines them."""
        converted, images = [], []
        for message in messages:
            role = "system" if message["role"] == "developer" else message["role"]
            content = message["content"]
            if isinstance(content, str) and self.multimodal:  # VLM templates iterate over parts
                content = [{"type": "text", "text": content}]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image":
                        if not self.multimodal:
                            raise RequestError(f"model '{self.config.model_type}' is a text-only language model and cannot take images",
                                               "drop the images or load a vision-language model")
                        images.append(part["image"])
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                if not self.multimodal:
                    content = "".join(p["text"] for p in parts)
                else:
                    content = parts
            converted.append({"role": role, "content": content})
        return converted, images

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        """A conversation rendered by the model's own chat template, ready for the reply."""
        from jinja2 import TemplateError

        converted, _ = self.hf_messages(messages)
        try:
            return self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError) as exc:
            raise RequestError(f"the model's chat template rejects this conversation: {exc}") from None

    def build_inputs(self, request: Request) -> dict[str, torch.Tensor]:
        """The model's inputs for one request (batch of one)."""
        return self.build_batch([request])

    def build_batch(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Model inputs for several requests at once, left-padded so that generation lines up."""
        return self.collate([self._one(r) for r in requests])

    def prompt_ids(self, request: Request) -> list[int]:
        """The token ids the model reads for a request, image placeholders expanded."""
        return self._one(request)["input_ids"][0].tolist()

    def _one(self, request: Request) -> dict[str, torch.Tensor]:
        images = request.all_images()
        if images and not self.multimodal:
            raise RequestError(f"model '{self.config.model_type}' is a text-only language model and cannot take images",
                               "drop the images or load a vision-language model")
        if request.token_ids is not None:
            return self._from_ids(request.token_ids, images)
        if request.messages is not None:
            text = self.chat_text(request.messages)
            # As transformers' own apply_chat_template(tokenize=True): a tokenizer never adds special
            # tokens to a templated prompt, a processor adds them unless the template starts with BOS.
            add_special = self.multimodal and not self._starts_with_bos(text)
        else:
            text = str(request.text)
            add_special = not self._starts_with_bos(text)  # raw text: BOS added as completions servers do
        return self._process(text, images, add_special)

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos and text.startswith(bos))

    def _process(self, text: str, images: list[Any], add_special: bool) -> dict[str, torch.Tensor]:
        kwargs = {"return_tensors": "pt", "add_special_tokens": add_special}
        if not self.multimodal:
            return dict(self.tokenizer([text], **kwargs))
        try:
            return dict(self.processor(text=[text], images=images or None, **kwargs))
        except (ValueError, IndexError) as exc:  # placeholders and images that do not match
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestError(f"the prompt's image placeholders and its {len(images)} image(s) do not match: {first}",
                               "give one image per placeholder (chat requests place them for you)") from None

    def _from_ids(self, ids: list[int], images: list[Any]) -> dict[str, torch.Tensor]:
        """Token ids used exactly as given; images run through the processor alone, and the ids
        must hold each image's tokens already expanded (as the processor expands them)."""
        self.check_token_ids(ids)
        input_ids = torch.tensor([ids])
        image_tokens = int(self.image_token_mask(input_ids).sum())
        if not images:
            if image_tokens:
                raise RequestError(f"the token-id prompt holds {image_tokens} image token(s) but no image was given",
                                   "send the images with the prompt, or drop the image tokens")
            return {"input_ids": input_ids, **self.token_fields(input_ids)}
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder is None:
            raise RequestError(f"the {self.family} processor names no image placeholder: token-id prompts cannot carry images")
        processed = self._process(placeholder * len(images), images, add_special=False)
        needed = int(self.image_token_mask(processed["input_ids"]).sum())
        if image_tokens != needed:
            raise RequestError(
                f"the token-id prompt holds {image_tokens} image token(s); its {len(images)} image(s) need {needed}",
                "expand each image placeholder as the model's processor does (the prompt_token_ids of a chat answer)",
            )
        per_token = {k for k, v in processed.items() if isinstance(v, torch.Tensor) and v.dim() == 2
                     and v.shape == processed["input_ids"].shape}
        images_only = {k: v for k, v in processed.items() if k not in per_token}
        return {"input_ids": input_ids, **self.token_fields(input_ids), **images_only}

    def check_token_ids(self, ids: list[int]) -> None:
        vocab = self.text_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the model's vocabulary (ids 0..{vocab - 1})")

    def token_fields(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-token inputs besides the ids that the processor would give for these ids."""
        return {"attention_mask": torch.ones_like(input_ids)}

    def append_tokens(self, inputs: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """A one-request input with token ids [n] appended (a reference answer, a continuation):
        every per-token field grows with it, as the processor would have made it."""
        length = inputs["input_ids"].shape[1]
        full = torch.cat([inputs["input_ids"][0], ids.to(inputs["input_ids"].dtype)])[None]
        out = dict(inputs)
        fields = self.token_fields(full)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length):
                out[key] = full if key == "input_ids" else fields.get(key, torch.cat([value, value.new_zeros(1, ids.numel())], 1))
        return out

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch from per-request inputs: per-token fields left-padded (pad id, mask 0),
        image tensors concatenated along their first axis (images, tiles or patches), as the
        families' processors batch them."""
        if len(items) == 1:
            return items[0]
        length = max(item["input_ids"].shape[1] for item in items)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: dict[str, torch.Tensor] = {}
        for key in items[0]:
            values = [item[key] for item in items if key in item]
            first = values[0]
            if first.dim() == 2 and first.shape == items[0]["input_ids"].shape:
                fill = pad if key == "input_ids" else 0
                out[key] = torch.cat([torch.nn.functional.pad(v, (length - v.shape[1], 0), value=fill) for v in values])
            else:
                out[key] = torch.cat(values)
        return out

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token on its own, special tokens included (for log-probability entries)."""
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    # ------------------------------------------------------------ loading (a family may override)
    @classmethod
    def model_class(cls) -> Any:
        """The transformers auto class (or the model's own class) that builds this family."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        return AutoModelForImageTextToText if cls.multimodal else AutoModelForCausalLM

    @classmethod
    def load_model(cls, path: Path, dtype: torch.dtype, trust_remote_code: bool = False,
                   attn_implementation: str | None = "sdpa") -> nn.Module:
        """The float model from a checkpoint directory, offline; `key_mapping` renames its weights."""
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if cls.key_mapping:
            kwargs["key_mapping"] = dict(cls.key_mapping)
        return cls.model_class().from_pretrained(path, **kwargs)

    @classmethod
    def build_model(cls, config: Any, dtype: torch.dtype) -> nn.Module:
        """The model from its transformers config, without weights (quantized checkpoints fill them)."""
        return cls.model_class().from_config(config, dtype=dtype)

    @classmethod
    def load_processor(cls, path: Path, model_type: str, trust_remote_code: bool = False) -> Any:
        """The tokenizer of a causal LM, or the image-only processor of a VLM, from local files."""
        from edgelmm.models.processors import load_processor

        return load_processor(path, model_type, cls.multimodal, trust_remote_code)

    @classmethod
    def saved_key(cls, key: str, config: Any) -> str:
        """A weight's name as the family's checkpoints spell it for every reader (vLLM included),
        from the name transformers saved it under; `finish_checkpoint` applies it."""
        return key

    @classmethod
    def finish_checkpoint(cls, folder: Path, config: Any) -> None:
        """Rename the saved weights of a checkpoint folder to `saved_key`, where any differ
        (safetensors files rewritten in place, the shard index with them)."""
        import json

        from safetensors import safe_open
        from safetensors.torch import save_file

        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                keys, metadata = list(handle.keys()), handle.metadata()
                if all(cls.saved_key(k, config) == k for k in keys):
                    continue
                tensors = {cls.saved_key(k, config): handle.get_tensor(k) for k in keys}
            save_file(tensors, str(file), metadata=metadata)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {cls.saved_key(k, config): v for k, v in data.get("weight_map", {}).items()}
            index.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def architecture(cls, config: Any) -> Architecture:
        """Sizes for `edgelmm plan` from the transformers config (no weights)."""
        raise EdgelmmError(f"the {cls.family} adapter does not size its models for the planner",
                           "implement architecture() in its adapter")

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
