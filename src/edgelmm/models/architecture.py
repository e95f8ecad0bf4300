"""How big a model is, from its config alone: the sizes `edgelmm plan` turns into memory and time.

Each family's adapter computes its `Architecture` (`ModelAdapter.architecture`) with the helpers
here; counts follow the transformers module trees exactly (the tests compare them with the real
classes instantiated on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgelmm.errors import EdgelmmError

KV_CACHE_BYTES = 2  # the KV cache is kept in fp16/bf16 whatever the weight bits
# Dynamic-resolution towers (Qwen-VL) get a 448 x 448 image by default: one InternVL tile, so that
# visual-token counts compare across families. Pass vision_tokens for larger images.
REFERENCE_IMAGE_PX = 448


def linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def norm_params(width: int, layer_norm: bool = True) -> int:
    """LayerNorm has a weight and a bias; RMSNorm only a weight."""
    return 2 * width if layer_norm else width


@dataclass(frozen=True)
class TextArch:
    """The decoder-only language model, reduced to what sizes memory and time."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None  # the model's trained context, when its config names one
    tied: bool
    linear_params: int  # q, k, v, o, gate, up, down weights: what weight-only quantization packs
    small_params: int  # biases and norms: kept in 16 bits by every toolchain

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        lm_head = 0 if self.tied else self.embedding_params
        return self.linear_params + self.small_params + self.embedding_params + lm_head

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_CACHE_BYTES


@dataclass(frozen=True)
class VisionArch:
    """Vision encoder plus projector (merger), with the token geometry of one image."""

    encoder_params: int  # patch/position embeddings, blocks, norms
    projector_params: int  # projector or patch merger(s), deepstack mergers included
    layers: int
    hidden: int
    intermediate: int
    tokens_per_image: int  # visual tokens the language model sees for one (reference) image
    patches_per_token: int  # encoder positions per visual token (merge / pixel-shuffle factor)

    @property
    def params(self) -> int:
        return self.encoder_params + self.projector_params


# Text decoders by text model_type: (q/k/v bias, o bias, per-head q/k RMSNorm). None reads
# config.attention_bias, for families where that flag switches the biases.
TEXT_LAYOUTS: dict[str, tuple[bool | None, bool | None, bool]] = {
    "llama": (None, None, False),
    "qwen2": (True, False, False),
    "qwen2_vl_text": (True, False, False),
    "qwen2_5_vl_text": (True, False, False),
    "qwen3": (None, None, True),
    "qwen3_vl_text": (None, None, True),
}


def tied_embeddings(raw: Mapping[str, Any], config: Any, text: Any) -> bool:
    """Whether lm_head shares the input embedding, as the checkpoint was saved.

    The key as written in config.json wins (top level, then text_config), then the text model's own
    default. Composite defaults are not trusted: transformers 5 defaults InternVL to tied, while the
    published InternVL checkpoints store a separate lm_head and say nothing in their config.
    """
    for section in (raw, raw.get("text_config") or {}):
        if "tie_word_embeddings" in section:
            return bool(section["tie_word_embeddings"])
    value = getattr(text, "tie_word_embeddings", None)
    return bool(getattr(config, "tie_word_embeddings", False) if value is None else value)


def text_arch(text: Any, tied: bool) -> TextArch:
    if text.model_type not in TEXT_LAYOUTS:
        raise EdgelmmError(
            f"language model type '{text.model_type}' is not known to the planner",
            f"supported: {', '.join(sorted(TEXT_LAYOUTS))}",
        )
    qkv_bias, o_bias, qk_norm = TEXT_LAYOUTS[text.model_type]
    attention_bias = bool(getattr(text, "attention_bias", False))
    qkv_bias = attention_bias if qkv_bias is None else qkv_bias
    o_bias = attention_bias if o_bias is None else o_bias
    mlp_bias = bool(getattr(text, "mlp_bias", False))
    h, i, heads = text.hidden_size, text.intermediate_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    d = getattr(text, "head_dim", None) or h // heads
    q, kv = heads * d, kv_heads * d
    linear = h * q + 2 * h * kv + q * h + 3 * h * i
    small = (
        (q + 2 * kv) * qkv_bias
        + h * o_bias
        + (2 * i + h) * mlp_bias
        + 2 * d * qk_norm
        + 2 * norm_params(h, layer_norm=False)
    )
    n = text.num_hidden_layers
    return TextArch(
        layers=n,
        hidden=h,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        intermediate=i,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
        tied=tied,
        linear_params=n * linear,
        small_params=n * small + norm_params(h, layer_norm=False),  # + the final norm
    )


def merger_params(width: int, merge: int, out: int, norm: int) -> int:
    """Qwen-VL patch merger: a norm of `norm` parameters, then an MLP over merge x merge
    neighbouring patches."""
    wide = width * merge * merge
    return norm + linear_params(wide, wide) + linear_params(wide, out)


def qwen_geometry(patch: int, merge: int) -> tuple[int, int]:
    """(visual tokens, patches per token) of a REFERENCE_IMAGE_PX square image."""
    side = REFERENCE_IMAGE_PX // (patch * merge)
    return side * side, merge * merge


@dataclass(frozen=True)
class Architecture:
    model_type: str
    text: TextArch
    vision: VisionArch | None


def transformers_config(raw: Mapping[str, Any]) -> Any:
    """transformers' own config class for config.json contents: it fills the defaults a file
    leaves out (llava-1.5 names neither its hidden size nor its layer count)."""
    from transformers import CONFIG_MAPPING

    model_type = str(raw.get("model_type"))
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except KeyError:
        raise EdgelmmError(f"transformers has no config class for model_type '{model_type}'") from None
    except (TypeError, ValueError) as exc:
        raise EdgelmmError(f"config.json of a '{model_type}' model is invalid: {exc}", "check the file") from None


def decoder_architecture(raw: Mapping[str, Any], vision: Any = None) -> Architecture:
    """The Architecture of a checkpoint whose language model is a standard decoder; `vision`
    sizes its vision side from the transformers config (None: a text-only model)."""
    config = transformers_config(raw)
    text = config.get_text_config()
    return Architecture(str(raw["model_type"]), text_arch(text, tied_embeddings(raw, config, text)),
                        vision(config) if vision else None)
