"""Memory-budget planning and roofline estimates (`edgelmm plan`).

The planner reads a checkpoint's config.json only — never its weights — and answers the first
question of edge deployment before anything is downloaded or loaded: do the weights, the KV cache
at the wanted context and the activations fit in the memory this device leaves to the model, and
how fast can it be at best? "At best" is a roofline: decoding one token must stream every
language-model weight and the whole KV cache from memory, prefill must do 2 FLOPs per parameter
per prompt token; each phase takes the longer of its memory time and its compute time at the
vendor's peak figures. Real engines reach some fraction of these bounds; the bounds tell which
device or bit-width is worth trying. A model's sizes come from its family's adapter
(`ModelAdapter.architecture`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelmm.config import HardwareProfile
from edgelmm.errors import EdgelmmError
from edgelmm.hardware.profiles import load_profile, peak_16bit_flops
from edgelmm.models.architecture import Architecture, TextArch

WEIGHT_BITS = (16, 8, 4)
GROUP_SIZE = 128  # weights per quantization group: one fp16 scale and one packed zero point each
DEFAULT_TEXT_TOKENS = 128  # text part of the default prompt (system prompt, question, template)


def architecture(raw: Mapping[str, Any]) -> Architecture:
    """Sizes of a checkpoint from its config.json contents, by its family's adapter."""
    from edgelmm.models.registry import adapter_class

    model_type = str(raw.get("model_type"))
    if model_type not in supported_model_types():
        raise EdgelmmError(f"model_type '{model_type}' is not known to the planner",
                           f"supported: {', '.join(supported_model_types())}")
    return adapter_class(model_type).architecture(raw)


def supported_model_types() -> list[str]:
    """model_type values whose adapter sizes its models for the planner (`planned_types`)."""
    from edgelmm.registry import MODEL_FAMILIES

    return sorted(t for _, cls in MODEL_FAMILIES.items() for t in cls.planned_types)


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
    trained_context: int | None = None  # the model's max_position_embeddings

    @property
    def warnings(self) -> list[str]:
        """What the plan allows but the model may not do well."""
        found = []
        if self.trained_context and self.context > self.trained_context:
            found.append(f"context {self.context} is beyond the {self.trained_context} tokens {self.model} was trained "
                         "for (max_position_embeddings): answers past it degrade unless the model extends its RoPE")
        return found

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
        keys = ("prompt_tokens", "weight_bytes", "total_bytes", "fits", "margin_bytes", "warnings")
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
        trained_context=arch.text.max_positions,
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
    rows += [("warning", w) for w in plan.warnings]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
