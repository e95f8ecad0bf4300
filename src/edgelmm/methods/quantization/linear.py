"""The W4A16 / W8A16 linear layer: packed integer weights in memory, 16-bit activations.

The module holds exactly what a compressed-tensors pack-quantized checkpoint holds
(`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_shape`), so saving is its state
dict and loading is `load_state_dict`, and the model's resident bytes are those of the packed
tensors. `forward` picks the fastest path the machine has, at run time:

* CUDA with Triton and few rows (decode): a fused kernel that reads the packed weights once and
  never materialises them in 16-bit (`kernel.py`);
* otherwise (CPU, prefill, no Triton): dequantize to the activation dtype and matmul, so the
  16-bit weight exists only for the duration of one layer's call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.methods.quantization import packing

# Above this many rows a GPU matmul on the dequantized weight beats the GEMV kernel (the weight
# is read once either way and cuBLAS is better at large tiles).
FUSED_MAX_ROWS = 16


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W = (q - zero) * scale per group of `group_size` input channels."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        per_word = 32 // bits
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // per_word, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            rows = -(-out_features // per_word)
            self.register_buffer("weight_zero_point", torch.zeros(rows, groups, dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: packing.QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        out_features, in_features = qw.q.shape
        layer = cls(in_features, out_features, qw.bits, qw.group_size, qw.zero is None, bias is not None, dtype, qw.q.device)
        layer.weight_packed.copy_(packing.pack_weight(qw.q, qw.bits))
        layer.weight_scale.copy_(qw.scale)
        if qw.zero is not None:
            layer.weight_zero_point.copy_(packing.pack_zero(qw.zero, qw.bits))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
        """Round-to-nearest quantization of a float linear layer (scales in its dtype)."""
        dtype = linear.weight.dtype
        qw = packing.quantize(linear.weight.detach(), bits, group_size, symmetric, dtype)
        return cls.from_quantized(qw, linear.bias, dtype)

    # ------------------------------------------------------------ weights
    def int_weight(self) -> packing.QuantizedWeight:
        """The signed integers, scales and zero points, unpacked (for conversion and tests)."""
        q = packing.unpack_weight(self.weight_packed, self.bits, self.in_features)
        zero = None
        if self.weight_zero_point is not None:
            zero = packing.unpack_zero(self.weight_zero_point, self.bits, self.out_features)
        return packing.QuantizedWeight(q, self.weight_scale, zero, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.int_weight().dequantize(dtype or self.weight_scale.dtype)

    # ------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and rows <= FUSED_MAX_ROWS:
            from edgelmm.methods.quantization import kernel

            if kernel.available(self):
                return kernel.linear(x, self)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        zero = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {zero}, bias={self.bias is not None}")


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each storage counted once.

    Storages, not tensor sizes: a view or a tied weight (embeddings shared with lm_head) costs
    its storage once, and a tensor that keeps a larger storage alive costs all of it. That is
    what stays resident, so it is the number to compare before and after quantization.
    """
    seen: dict[tuple[str, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
