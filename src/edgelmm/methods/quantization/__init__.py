"""Weight quantization: W4A16 / W8A16 with round-to-nearest or AWQ, saved for any engine.

    from edgelmm.methods.quantization import AWQConfig, quantize, save_quantized, convert_to_awq
    quantize(model, adapter, AWQConfig(bits=4, group_size=128, calibration="texts.jsonl"))
    save_quantized(model, processor, adapter, "out/model-awq")      # compressed-tensors pack-quantized
    convert_to_awq("out/model-awq", "out/model-autoawq")            # AutoAWQ GEMM layout

In a model spec or benchmark matrix the same configs are `rtn(bits=4, group_size=128)` and
`awq(bits=4, group_size=128, calibration='texts.jsonl')`.
"""

from __future__ import annotations

from edgelmm.methods.quantization.calibration import CalibrationBatch, calibration_batches, calibration_data
from edgelmm.methods.quantization.checkpoint import convert_to_awq, load_quantized, load_quantized_model, save_quantized
from edgelmm.methods.quantization.config import AWQConfig, CalibrationConfig, QuantConfig, RTNConfig
from edgelmm.methods.quantization.linear import QuantLinear, kernel_choices, prepare, set_cuda_kernel, weight_bytes
from edgelmm.methods.quantization.quantize import quantize, quantize_checkpoint, target_linears

__all__ = [
    "AWQConfig", "CalibrationBatch", "CalibrationConfig", "QuantConfig", "QuantLinear", "RTNConfig",
    "calibration_batches", "calibration_data", "convert_to_awq", "kernel_choices", "load_quantized",
    "load_quantized_model", "prepare", "quantize", "quantize_checkpoint", "save_quantized", "set_cuda_kernel",
    "target_linears", "weight_bytes",
]
