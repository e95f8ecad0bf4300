"""Hardware profiles, memory-budget planning and roofline estimates (`edgelmm plan`).

Profiles are YAML files in configs/hardware/ (no hardware figure lives in this module). The planner
reads a checkpoint's config.json only — never its weights — and answers the first question of edge
deployment before anything is downloaded or loaded: do the weights, the KV cache at the wanted
context and the activations fit in the memory this device leaves to the model, and how fast can it
be at best? "At best" is a roofline: decoding one token must stream every language-model weight and
the whole KV cache from memory, prefill must do 2 FLOPs per parameter per prompt token; each phase
takes the longer of its memory time and its compute time at the vendor's peak figures. Real engines
reach some fraction of these bounds; the bounds tell which device or bit-width is worth trying.

Parameter counts follow the transformers module trees of each supported family exactly (the tests
compare them with the real classes instantiated on the meta device).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelmm.config import HardwareProfile, load_yaml
from edgelmm.errors import EdgelmmError

PROFILE_DIR = Path(__file__).parent / "configs" / "hardware"

WEIGHT_BITS = (16, 8, 4)
GROUP_SIZE = 128  # weights per quantization group: one fp16 scale and one packed zero point each
KV_CACHE_BYTES = 2  # the KV cache is kept in fp16/bf16 whatever the weight bits
DEFAULT_TEXT_TOKENS = 128  # text part of the default prompt (system prompt, question, template)
# Dynamic-resolution towers (Qwen-VL) get a 448 x 448 image by default: one InternVL tile, so that
# visual-token counts compare across families. Pass vision_tokens for larger images.
REFERENCE_IMAGE_PX = 448


# ---------------------------------------------------------------- profiles


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str | Path) -> HardwareProfile:
    """A bundled profile by name, or any profile YAML by path (for your own board)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise EdgelmmError(
                f"unknown hardware profile '{name}'",
                f"available: {', '.join(list_profiles())}; or give the path of a profile YAML",
            )
    profile = load_yaml(path, HardwareProfile)
    if profile.name != path.stem:
        raise EdgelmmError(
            f"{path}: key 'name' is '{profile.name}' but the file is {path.name}",
            f"set name: {path.stem}, so that --hardware {path.stem} finds this profile",
        )
    return profile


def guess_profile(device: Any, memory_gb: float | None = None) -> HardwareProfile | None:
    """The profile for a device: 'cpu', 'cuda[:i]', a torch.device, or a device name.

    A profile matches when one of its `match` substrings occurs in the device name. Several Jetson
    modules share one name ("Orin"), so among matches the one whose capacity is nearest the device's
    memory wins (the smallest when the memory is unknown: the conservative plan). None when no
    profile matches, so that callers can still run without a roofline.
    """
    name = str(device)
    if name.split(":")[0] == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.device(name).index or 0)
        name, memory_gb = props.name, props.total_memory / 1e9
    matches = [
        profile
        for profile in map(load_profile, list_profiles())
        if any(m.lower() in name.lower() for m in profile.match)
    ]
    if not matches:
        return None

    def distance(profile: HardwareProfile) -> float:
        capacity = profile.memory.capacity_gb
        return abs(capacity - memory_gb) if memory_gb else capacity

    return min(matches, key=distance)


def peak_16bit_flops(profile: HardwareProfile) -> float | None:
    """Dense FLOP/s for 16-bit matmuls; FP32 where a device (a CPU) publishes no faster 16-bit rate.

    Weight-only quantization (W4A16, W8A16) still multiplies in 16 bits, so this rate serves every
    weight_bits.
    """
    c = profile.compute
    tflops = c.bf16_tflops or c.fp16_tflops or c.fp32_tflops
    return tflops * 1e12 if tflops else None


# ---------------------------------------------------------------- architecture from config.json


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(width: int, layer_norm: bool = True) -> int:
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


def _tied_embeddings(raw: Mapping[str, Any], config: Any, text: Any) -> bool:
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


def _text_arch(text: Any, tied: bool) -> TextArch:
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
        + 2 * _norm(h, layer_norm=False)
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
        small_params=n * small + _norm(h, layer_norm=False),  # + the final norm
    )


def _merger(width: int, merge: int, out: int, norm_params: int) -> int:
    """Qwen-VL patch merger: norm, then an MLP over merge x merge neighbouring patches."""
    wide = width * merge * merge
    return norm_params + _linear(wide, wide) + _linear(wide, out)


def _qwen_geometry(patch: int, merge: int) -> tuple[int, int]:
    """(visual tokens, patches per token) of a REFERENCE_IMAGE_PX square image."""
    side = REFERENCE_IMAGE_PX // (patch * merge)
    return side * side, merge * merge


def _llava(config: Any) -> VisionArch:
    v, t = config.vision_config, config.get_text_config()
    if v.model_type != "clip_vision_model":
        raise EdgelmmError(f"llava with a '{v.model_type}' vision tower is not known to the planner", "supported: CLIP")
    h, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    block = 4 * _linear(h, h) + 2 * _norm(h) + _linear(h, i) + _linear(i, h)
    # class token, patch conv (no bias), positions for patches + class token, pre- and post-norm
    encoder = h + v.num_channels * v.patch_size**2 * h + (patches + 1) * h + 2 * _norm(h)
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    bias = config.multimodal_projector_bias
    projector = _linear(h * feature_layers, t.hidden_size, bias) + _linear(t.hidden_size, t.hidden_size, bias)
    tokens = patches + (config.vision_feature_select_strategy == "full")  # "default" drops the class token
    return VisionArch(encoder + v.num_hidden_layers * block, projector, v.num_hidden_layers, h, i, tokens, 1)


def _qwen2_vl(config: Any) -> VisionArch:
    v = config.vision_config
    e, i, m = v.embed_dim, int(v.embed_dim * v.mlp_ratio), v.spatial_merge_size
    block = 2 * _norm(e) + _linear(e, 3 * e) + _linear(e, e) + _linear(e, i) + _linear(i, e)
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * e  # Conv3d, no bias
    tokens, per_token = _qwen_geometry(v.patch_size, m)
    projector = _merger(e, m, v.hidden_size, _norm(e))
    return VisionArch(patch_embed + v.depth * block, projector, v.depth, e, i, tokens, per_token)


def _qwen2_5_vl(config: Any) -> VisionArch:
    v = config.vision_config
    h, i, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    # RMSNorms and a gated (SwiGLU) MLP with biases
    block = 2 * _norm(h, False) + _linear(h, 3 * h) + _linear(h, h) + 2 * _linear(h, i) + _linear(i, h)
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h
    tokens, per_token = _qwen_geometry(v.patch_size, m)
    projector = _merger(h, m, v.out_hidden_size, _norm(h, False))
    return VisionArch(patch_embed + v.depth * block, projector, v.depth, h, i, tokens, per_token)


def _qwen3_vl(config: Any) -> VisionArch:
    v = config.vision_config
    h, i, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    block = 2 * _norm(h) + _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h)
    # Conv3d with bias, plus a learned position table interpolated to the image grid
    embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h + h + v.num_position_embeddings * h
    tokens, per_token = _qwen_geometry(v.patch_size, m)
    # the final merger normalises before merging; each deepstack merger (features of an inner block
    # fed into an early decoder layer) normalises the merged, 4x wider vector
    projector = _merger(h, m, v.out_hidden_size, _norm(h)) + len(v.deepstack_visual_indexes) * _merger(
        h, m, v.out_hidden_size, _norm(h * m * m)
    )
    return VisionArch(embed + v.depth * block, projector, v.depth, h, i, tokens, per_token)


def _internvl(config: Any) -> VisionArch:
    v, t = config.vision_config, config.get_text_config()
    h, i = v.hidden_size, v.intermediate_size
    (image_h, image_w), (patch_h, patch_w) = v.image_size, v.patch_size
    patches = (image_h // patch_h) * (image_w // patch_w)
    block = (
        3 * _linear(h, h, v.attention_bias)
        + _linear(h, h)  # output projection always has a bias
        + 2 * h * v.use_qk_norm  # RMSNorm over the whole width
        + 2 * _norm(h, v.norm_type == "layer_norm")
        + _linear(h, i)
        + _linear(i, h)
        + 2 * h  # layer-scale vectors lambda_1, lambda_2
    )
    encoder = (
        h * (1 + v.use_mask_token)  # class token (+ mask token)
        + _linear(v.num_channels * patch_h * patch_w, h)  # patch conv with bias
        + (patches + 1) * h * v.use_absolute_position_embeddings
        + (0 if v.use_mean_pooling else _norm(h))
    )
    shuffle = int(1 / config.downsample_ratio) ** 2  # pixel shuffle folds shuffle patches into one token
    wide = h * shuffle
    projector = _norm(wide) + _linear(wide, t.hidden_size) + _linear(t.hidden_size, t.hidden_size)
    n = v.num_hidden_layers
    return VisionArch(encoder + n * block, projector, n, h, i, patches // shuffle, shuffle)


# Vision-language families by config.model_type; a new family is one function and one line here.
VISION_FAMILIES: dict[str, Callable[[Any], VisionArch]] = {
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
}
TEXT_FAMILIES = ("llama", "qwen2", "qwen3")


def supported_model_types() -> list[str]:
    return sorted([*VISION_FAMILIES, *TEXT_FAMILIES])


@dataclass(frozen=True)
class Architecture:
    model_type: str
    text: TextArch
    vision: VisionArch | None


def architecture(raw: Mapping[str, Any]) -> Architecture:
    """Sizes of a checkpoint from its config.json contents.

    transformers' own config class fills the defaults a config.json leaves out (llava-1.5 names
    neither its hidden size nor its layer count), so the counts match what transformers builds.
    """
    model_type = raw.get("model_type")
    if model_type not in VISION_FAMILIES and model_type not in TEXT_FAMILIES:
        raise EdgelmmError(
            f"model_type '{model_type}' is not known to the planner",
            f"supported: {', '.join(supported_model_types())}",
        )
    from transformers import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except (TypeError, ValueError) as exc:
        raise EdgelmmError(f"config.json of a '{model_type}' model is invalid: {exc}", "check the file") from None
    text = config.get_text_config()
    vision = VISION_FAMILIES[model_type](config) if model_type in VISION_FAMILIES else None
    return Architecture(model_type, _text_arch(text, _tied_embeddings(raw, config, text)), vision)


# ---------------------------------------------------------------- plan


def bits_per_weight(weight_bits: int) -> float:
    """Stored bits per quantized weight: GPTQ/AWQ keep, per group of GROUP_SIZE weights, an fp16
    scale and a zero point packed at weight_bits (4-bit: 4.156, 8-bit: 8.188)."""
    if weight_bits not in WEIGHT_BITS:
        raise EdgelmmError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits}")
    return 16.0 if weight_bits == 16 else weight_bits + (16 + weight_bits) / GROUP_SIZE


def lm_weight_bytes(text: TextArch, weight_bits: int) -> int:
    """Linear layers at weight_bits; embeddings, lm_head, biases and norms in 16 bits, as AWQ, GPTQ
    and llm-compressor leave them."""
    rest = text.params - text.linear_params
    return round(text.linear_params * bits_per_weight(weight_bits) / 8) + 2 * rest


def _decode_step(text: TextArch, weight_bits: int, context: int, batch: int, profile: HardwareProfile) -> float:
    """Seconds per decode step (one new token for each of `batch` sequences at a full context).

    Memory: every linear weight and the full vocab x hidden output matrix (lm_head, or the tied
    embedding) are read once per step, plus each sequence's KV cache. Compute: 2 FLOPs per weight
    per token plus the attention over the context. The slower of the two bounds the step.
    """
    weights = lm_weight_bytes(text, weight_bits) - 2 * text.embedding_params * (not text.tied)
    read = weights + batch * context * text.kv_bytes_per_token
    memory_s = read / (profile.memory.bandwidth_gbs * 1e9)
    attention = 4 * text.layers * text.heads * text.head_dim * context  # q.K and p.V over the context
    flops = batch * (2 * (text.linear_params + text.embedding_params) + attention)
    peak = peak_16bit_flops(profile)
    return max(memory_s, flops / peak if peak else 0.0)


@dataclass(frozen=True)
class Plan:
    """Memory budget and roofline of one model on one device; sizes in bytes, 1 GB = 1e9 bytes."""

    model: str
    model_type: str
    hardware: str
    weight_bits: int
    context: int
    batch: int
    text_tokens: int  # per sequence in the prefill prompt
    vision_tokens: int  # per sequence in the prefill prompt
    vision_params: int  # encoder + projector
    lm_params: int  # embeddings, decoder, final norm, lm_head (counted once when tied)
    lm_linear_params: int  # the part stored at weight_bits
    tied_embeddings: bool
    vision_weight_bytes: int
    lm_weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int  # at context x batch
    activation_bytes: int
    usable_bytes: int
    bandwidth_gbs: float
    peak_tflops: float | None  # 16-bit dense rate the prefill estimate used
    decode_tok_s: float  # per sequence, at a full context
    prefill_s: float  # the whole batch's prompts, vision encoder included

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.vision_tokens

    @property
    def weight_bytes(self) -> int:
        return self.vision_weight_bytes + self.lm_weight_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def margin_bytes(self) -> int:
        """Usable memory left over; negative when the plan does not fit."""
        return self.usable_bytes - self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        keys = ("prompt_tokens", "weight_bytes", "total_bytes", "fits", "margin_bytes")
        return {**asdict(self), **{k: getattr(self, k) for k in keys}}


def _activation_bytes(arch: Architecture, text_tokens: int, vision_tokens: int, batch: int) -> int:
    """Peak transient memory of a prefill, as an allowance on top of weights and KV cache.

    Per sequence, the larger of (a) one decoder layer over the n prompt tokens, 2 bytes x n x
    (4 x hidden + 3 x intermediate): residual, normed input and q/k/v/attention output, then the
    MLP's gate, up and their product; and (b) one vision block over the image's patches with the
    same formula at the vision widths (the tower finishes before the decoder starts). Plus the
    fp32 logits of the last position, 4 bytes x vocab. Attention is assumed fused (SDPA/flash), so
    no n x n score matrix is held.
    """
    t, v = arch.text, arch.vision
    n = text_tokens + vision_tokens
    lm = 2 * n * (4 * t.hidden + 3 * t.intermediate)
    vision = 2 * vision_tokens * v.patches_per_token * (4 * v.hidden + 3 * v.intermediate) if v else 0
    return batch * (max(lm, vision) + 4 * t.vocab)


def _prefill_s(
    arch: Architecture, weight_bytes: int, text_tokens: int, vision_tokens: int, batch: int, profile: HardwareProfile
) -> float:
    """Seconds to prefill `batch` prompts, vision encoder included.

    Compute: 2 FLOPs per linear weight per prompt token, causal attention 2 x n^2 x heads x head_dim
    per layer, logits of the last position only; the vision encoder does 2 FLOPs per parameter per
    patch plus full attention over the patches (an upper bound for windowed towers) and the
    projector 2 FLOPs per parameter per visual token. Memory: every weight read once.
    """
    t, v = arch.text, arch.vision
    n = text_tokens + vision_tokens
    flops = 2 * t.linear_params * n + 2 * t.layers * t.heads * t.head_dim * n * n + 2 * t.embedding_params
    if v and vision_tokens:
        patches = vision_tokens * v.patches_per_token
        flops += 2 * v.encoder_params * patches + 4 * v.layers * v.hidden * patches**2
        flops += 2 * v.projector_params * vision_tokens
    peak = peak_16bit_flops(profile)
    memory_s = weight_bytes / (profile.memory.bandwidth_gbs * 1e9)
    return max(memory_s, batch * flops / peak if peak else 0.0)


def _read_config(source: Mapping[str, Any] | str | Path | Any) -> tuple[dict[str, Any], str]:
    """(config.json contents, display name) from a dict, a transformers config or a checkpoint dir."""
    if isinstance(source, Mapping):
        return dict(source), str(source.get("_name_or_path") or source.get("model_type"))
    if hasattr(source, "to_dict"):
        raw = source.to_dict()
        return raw, str(getattr(source, "name_or_path", "") or raw.get("model_type"))
    path = Path(source).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if file.name != "config.json" or not file.is_file():
        raise EdgelmmError(
            f"no config.json in {path}", "point to a Hugging Face checkpoint directory (the one holding config.json)"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise EdgelmmError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise EdgelmmError(f"{file} has no 'model_type'", "is this a transformers checkpoint?")
    return raw, file.parent.name


def _as_profile(profile: HardwareProfile | str | Path) -> HardwareProfile:
    return profile if isinstance(profile, HardwareProfile) else load_profile(profile)


def plan(
    config: Mapping[str, Any] | str | Path | Any,
    profile: HardwareProfile | str | Path,
    weight_bits: int = 16,
    context: int | None = None,
    batch: int = 1,
    vision_tokens: int | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> Plan:
    """Plan one model on one device.

    config: config.json contents, a transformers config, or a checkpoint directory.
    context: tokens of KV cache per sequence; default the profile's engine max_context, capped at
    the model's max_position_embeddings.
    vision_tokens: visual tokens per prompt; default one image as the vision config sizes it
    (dynamic-resolution towers: a REFERENCE_IMAGE_PX square image); 0 for a text-only prompt.
    """
    raw, name = _read_config(config)
    hw = _as_profile(profile)
    arch = architecture(raw)
    if context is None:
        context = min(hw.engine.max_context, arch.text.max_positions or hw.engine.max_context)
    if context < 1 or batch < 1 or text_tokens < 0 or (vision_tokens or 0) < 0:
        raise EdgelmmError(
            f"context and batch must be at least 1, token counts at least 0 (got context={context},"
            f" batch={batch}, text_tokens={text_tokens}, vision_tokens={vision_tokens})"
        )
    if vision_tokens is None:
        vision_tokens = arch.vision.tokens_per_image if arch.vision else 0
    elif vision_tokens and not arch.vision:
        raise EdgelmmError(f"{name} has no vision tower, but vision_tokens={vision_tokens} was asked for")
    if text_tokens + vision_tokens > context:
        raise EdgelmmError(
            f"the prompt ({text_tokens} text + {vision_tokens} visual tokens) is longer than the context ({context})",
            "raise the context, or ask for fewer vision tokens",
        )
    vision_bytes = 2 * arch.vision.params if arch.vision else 0
    lm_bytes = lm_weight_bytes(arch.text, weight_bits)
    peak = peak_16bit_flops(hw)
    return Plan(
        model=name,
        model_type=arch.model_type,
        hardware=hw.name,
        weight_bits=weight_bits,
        context=context,
        batch=batch,
        text_tokens=text_tokens,
        vision_tokens=vision_tokens,
        vision_params=arch.vision.params if arch.vision else 0,
        lm_params=arch.text.params,
        lm_linear_params=arch.text.linear_params,
        tied_embeddings=arch.text.tied,
        vision_weight_bytes=vision_bytes,
        lm_weight_bytes=lm_bytes,
        kv_bytes_per_token=arch.text.kv_bytes_per_token,
        kv_bytes=arch.text.kv_bytes_per_token * context * batch,
        activation_bytes=_activation_bytes(arch, text_tokens, vision_tokens, batch),
        usable_bytes=round(hw.usable_bytes),
        bandwidth_gbs=hw.memory.bandwidth_gbs,
        peak_tflops=peak / 1e12 if peak else None,
        decode_tok_s=1.0 / _decode_step(arch.text, weight_bits, context, batch, hw),
        prefill_s=_prefill_s(arch, vision_bytes + lm_bytes, text_tokens, vision_tokens, batch, hw),
    )


def plan_from_path(
    model_dir_or_name: str | Path,
    hardware: HardwareProfile | str | Path,
    weight_bits: int = 16,
    context: int | None = None,
    batch: int = 1,
) -> Plan:
    """What `edgelmm plan` calls: a checkpoint directory, or a bundled model by name."""
    path = Path(model_dir_or_name).expanduser()
    if not path.exists():
        from edgelmm.models.loader import resolve_model_path

        path = resolve_model_path(str(model_dir_or_name))
    return plan(path, hardware, weight_bits=weight_bits, context=context, batch=batch)


def roofline_decode_tok_s(
    config: Mapping[str, Any] | str | Path | Any,
    profile: HardwareProfile | str | Path,
    weight_bits: int = 16,
    context: int = 1,
    batch: int = 1,
) -> float:
    """Upper bound on decode tokens/s per sequence, for a benchmark to set beside its measurement.

    context: tokens already in the KV cache at the step (prompt plus generated so far).
    """
    raw, _ = _read_config(config)
    return 1.0 / _decode_step(architecture(raw).text, weight_bits, context, batch, _as_profile(profile))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_plan(plan: Plan) -> str:
    """A table for the terminal."""
    bits = "16-bit" if plan.weight_bits == 16 else f"{plan.weight_bits}-bit linear layers, group {GROUP_SIZE}"
    verdict = (
        f"FITS, {_gb(plan.margin_bytes)} to spare"
        if plan.fits
        else f"DOES NOT FIT by {_gb(-plan.margin_bytes)}"
    )
    peak = f"{plan.peak_tflops:g} TFLOP/s" if plan.peak_tflops else "no compute figure"
    tied = "tied to" if plan.tied_embeddings else "separate from"
    params = f"language {plan.lm_params / 1e9:.3f} B (lm_head {tied} embeddings)"
    weights = f"language {_gb(plan.lm_weight_bytes)} ({bits})"
    if plan.vision_params:
        total = (plan.vision_params + plan.lm_params) / 1e9
        params = f"{total:.3f} B = vision {plan.vision_params / 1e9:.3f} B + {params}"
        weights = f"{_gb(plan.weight_bytes)} = vision {_gb(plan.vision_weight_bytes)} (16-bit) + {weights}"
    rows = [
        ("model", f"{plan.model} ({plan.model_type})"),
        ("hardware", f"{plan.hardware}: {_gb(plan.usable_bytes)} usable, {plan.bandwidth_gbs:g} GB/s, {peak}"),
        ("parameters", params),
        ("weights", weights),
        ("KV cache", f"{plan.kv_bytes_per_token / 1e3:.1f} KB/token; {_gb(plan.kv_bytes)}"
         f" at {plan.context} tokens x {plan.batch}"),
        ("activations", f"{_gb(plan.activation_bytes)} (prefill of {plan.prompt_tokens} tokens:"
         f" {plan.text_tokens} text + {plan.vision_tokens} visual, x {plan.batch})"),
        ("total", f"{_gb(plan.total_bytes)} of {_gb(plan.usable_bytes)} usable — {verdict}"),
        ("decode", f"<= {plan.decode_tok_s:.1f} tok/s per sequence"
         + (f", {plan.decode_tok_s * plan.batch:.1f} for the batch" if plan.batch > 1 else "")
         + " at a full context (roofline)"),
        ("prefill", f">= {plan.prefill_s * 1e3:.0f} ms for the batch's prompts (roofline)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
