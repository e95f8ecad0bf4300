"""What to quantize and how: small frozen dataclasses, checked when made (as torchao's configs).

`RTNConfig` rounds each weight group to the nearest level; `AWQConfig` first searches
per-input-channel scales on calibration activations (and optionally a clipping range) and then
rounds the same way. Both store weights as `bits`-bit integers with one scale (and, unless
`symmetric`, one zero point) per `group_size` input channels, the W4A16 / W8A16 layout that
compressed-tensors, vLLM and AutoAWQ share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgelmm.errors import EdgelmmError
from edgelmm.methods.base import Method

SUPPORTED_BITS = (4, 8)
# Modules beyond the language model's decoder layers that may be quantized on request. The
# embeddings never are: no engine reads a packed embedding table from these formats.
EXTRA_TARGETS = ("lm_head", "vision_tower", "projector")


@dataclass(frozen=True, kw_only=True)
class QuantConfig(Method):
    """Shared by every method: the storage format of the quantized linear layers.

    `extra` names modules quantized besides the language model's decoder layers (see
    EXTRA_TARGETS); by default the vision tower, projector, embeddings and lm_head stay 16-bit,
    as production toolchains keep them.
    """

    name: ClassVar[str] = "rtn"
    runner: ClassVar[str] = "edgelmm.methods.quantization.quantize:apply_config"
    shown: ClassVar[tuple[str, ...]] = ("bits", "group_size")
    renamed: ClassVar[dict[str, str]] = {"w_bit": "bits", "group": "group_size", "q_group_size": "group_size"}

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", tuple(self.extra))
        if self.bits not in SUPPORTED_BITS:
            raise EdgelmmError(
                f"unsupported weight bits: {self.bits}", f"use one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        per_word = 32 // self.bits
        if self.group_size <= 0 or self.group_size % per_word:
            raise EdgelmmError(
                f"unsupported group size: {self.group_size}",
                f"use a positive multiple of {per_word} that divides the layer widths, e.g. 128",
            )
        unknown = sorted(set(self.extra) - set(EXTRA_TARGETS))
        if unknown:
            raise EdgelmmError(f"unknown module(s) to quantize: {', '.join(unknown)}", f"choose from {', '.join(EXTRA_TARGETS)}")

    def describe(self) -> str:
        return f"{self.name} w{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True, kw_only=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest: no calibration data, seconds for any model; the baseline AWQ must beat."""

    name: ClassVar[str] = "rtn"


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into samples.

    `source`: a local .txt / .jsonl file, a folder written by `datasets.save_to_disk`,
    "hf:NAME[:SPLIT]" for a Hugging Face dataset that is already in the local cache (nothing is
    downloaded), or a named source of `edgelmm.registry.CALIBRATION_SOURCES` (the demo's
    "shapes": shapes-world captions; "shapes-images": a VLM's own chat inputs with pictures, for
    which `concat`, `padding` and `max_seq_len` do not apply). With `concat`, texts are joined
    and cut into `num_samples` blocks of exactly `max_seq_len` tokens (AutoAWQ's way, no padding
    needed); without it each text is one sample, truncated to `max_seq_len`, and samples are
    either padded to one length (`padding`) or fed one at a time.
    """

    source: str
    num_samples: int = 128
    max_seq_len: int = 512
    concat: bool = True
    padding: bool = False
    text_field: str = "text"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise EdgelmmError("a calibration source is needed", "give a .txt / .jsonl file, a datasets folder or hf:NAME")
        for name in ("num_samples", "max_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise EdgelmmError(f"calibration {name} must be at least 1, got {getattr(self, name)}")


def as_calibration(value: Any) -> CalibrationConfig | None:
    """A calibration setting as written in a spec: a source string, a dict of fields, or the config."""
    if value is None or isinstance(value, CalibrationConfig):
        return value
    if isinstance(value, str):
        return CalibrationConfig(source=value)
    if isinstance(value, dict):
        from edgelmm.registry import construct

        return construct(CalibrationConfig, value, "calibration")
    raise EdgelmmError(f"calibration must be a source string or a dict of its settings, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AWQConfig(QuantConfig):
    """Activation-aware weight quantization (Lin et al., 2024), as AutoAWQ implements it.

    Per decoder layer: the input channels that carry large activations are scaled up before
    rounding (and the inverse folded into the preceding norm or linear, so the float function is
    unchanged), with the scale `s = mean|x|^a / mean|w|^(1-a)` (`duo_scaling`, AutoAWQ's default;
    `mean|x|^a` alone is the paper's) and `a` on a `grid`-point grid in [0, 1) chosen by the
    output error of the block; then each linear's weights are clipped to the range, searched on
    `clip_grid` points down to `1 - max_shrink` of the maximum, that minimises its output error.
    The activation statistics come from every calibration token; the grid's loss is computed on
    `search_tokens` of them (spread over the calibration samples), which is what keeps the search
    in proportion to the model: every grid point runs the block on those tokens once.
    `calibration` is the data the search runs on (a CalibrationConfig, a source string or a dict
    of its fields); it has no default: what a model should be calibrated on is the user's call.
    """

    name: ClassVar[str] = "awq"
    shown: ClassVar[tuple[str, ...]] = ("bits", "group_size", "calibration")

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # calibration tokens used by the clipping search, as AutoAWQ's n_sample_token
    search_tokens: int = 8192  # calibration tokens the scale grid's loss is computed on
    calibration: CalibrationConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "calibration", as_calibration(self.calibration))
        if self.search_tokens < 1 or self.clip_tokens < 1:
            raise EdgelmmError("AWQ needs at least one token to search on", "use search_tokens >= 1 and clip_tokens >= 1")
        if self.grid < 1 or self.clip_grid < 1:
            raise EdgelmmError("AWQ grids need at least one point", "use grid >= 1 and clip_grid >= 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise EdgelmmError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


__all__ = ["AWQConfig", "CalibrationConfig", "QuantConfig", "RTNConfig", "EXTRA_TARGETS", "SUPPORTED_BITS", "as_calibration"]
