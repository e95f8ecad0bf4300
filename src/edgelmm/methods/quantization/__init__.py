"""Weight quantization: W4A16 / W8A16 with round-to-nearest or AWQ, saved for any engine.

    from edgelmm.methods.quantization import AWQConfig, CalibrationConfig, quantize, save_quantized
    quantize(model, adapter, AWQConfig(bits=4, group_size=128), CalibrationConfig(source="shapes"))
    save_quantized(model, processor, adapter, "out/shapes-vlm-s-awq")  # compressed-tensors pack-quantized
    convert_to_awq("out/shapes-vlm-s-awq", "out/shapes-vlm-s-autoawq")  # AutoAWQ GEMM layout

Both methods are registered for model specs and benchmark matrices as
`rtn(w_bit=4, group=128)` and `awq(w_bit=4, group=128, calib='shapes', samples=128, seq_len=512)`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgelmm.methods import register_method
from edgelmm.methods.quantization.calibration import CalibrationBatch, calibration_batches, calibration_data
from edgelmm.methods.quantization.checkpoint import (
    convert_to_awq,
    is_quantized_checkpoint,
    load_quantized,
    load_quantized_model,
    save_quantized,
)
from edgelmm.methods.quantization.config import AWQConfig, CalibrationConfig, QuantConfig, RTNConfig, make_config
from edgelmm.methods.quantization.linear import QuantLinear, kernel_choices, prepare, set_cuda_kernel, weight_bytes
from edgelmm.methods.quantization.quantize import quantize, quantize_checkpoint, target_linears
from edgelmm.models.base import ModelAdapter

__all__ = [
    "AWQConfig", "CalibrationBatch", "CalibrationConfig", "QuantConfig", "QuantLinear", "RTNConfig",
    "calibration_batches", "calibration_data", "convert_to_awq", "is_quantized_checkpoint", "kernel_choices", "load_quantized",
    "load_quantized_model", "make_config", "prepare", "quantize", "quantize_checkpoint", "save_quantized", "set_cuda_kernel",
    "target_linears", "weight_bytes",
]


@register_method("rtn")
def _rtn(
    model: nn.Module, adapter: ModelAdapter, w_bit: int = 4, group: int = 128, symmetric: bool = False,
    extra: tuple[str, ...] = (),
) -> nn.Module:
    config = RTNConfig(bits=w_bit, group_size=group, symmetric=symmetric, extra=tuple(extra))
    return quantize(model, adapter, config, progress=False)


@register_method("awq")
def _awq(
    model: nn.Module, adapter: ModelAdapter, w_bit: int = 4, group: int = 128, symmetric: bool = False,
    extra: tuple[str, ...] = (), calib: str = "shapes", samples: int = 128, seq_len: int = 512, **search: Any,
) -> nn.Module:
    """`search` takes AWQConfig's search settings (grid, duo_scaling, clip, clip_grid, max_shrink)."""
    config = make_config("awq", bits=w_bit, group_size=group, symmetric=symmetric, extra=tuple(extra), **search)
    calibration = CalibrationConfig(source=calib, num_samples=samples, max_seq_len=seq_len)
    return quantize(model, adapter, config, calibration, progress=False)
