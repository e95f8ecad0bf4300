"""Group-wise integer quantization and the two int32 packings that engines read.

Conventions follow compressed-tensors (and so vLLM and transformers): integer values are
signed, `q` in [-2^(b-1), 2^(b-1) - 1], the zero point likewise, and a weight is
`(q - zero) * scale`. Packing adds 2^(b-1) to make them unsigned and puts 32/b of them in one
int32, element j of a word at bits [b*j, b*j + b): weights are packed along the input dimension
(`[out, in * b / 32]`), zero points along the output dimension (`[ceil(out * b / 32), groups]`).

AutoAWQ's GEMM layout (`qweight [in, out / 8]`) keeps the integers unsigned and packs along the
output dimension in the interleaved order AWQ_ORDER, so that its CUDA kernel can unpack pairs of
values with one instruction; `pack_awq` / `unpack_awq` convert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot i holds column AWQ_ORDER[i] of each 8 columns
AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


@dataclass
class QuantizedWeight:
    """Signed integer weights [out, in] (int8), scales [out, groups] and zero points [out, groups]
    (int8; None when symmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.group_size, dtype or self.scale.dtype)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = weight.shape
    return weight.reshape(out, inp // group_size, group_size)


def quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> QuantizedWeight:
    """Round-to-nearest per group of `group_size` input channels.

    Asymmetric groups span [min(w, 0), max(w, 0)] in 2^b - 1 steps, as compressed-tensors'
    min-max observer does (keeping 0 in range means an all-positive group still rounds well);
    symmetric ones use max|w| / (2^b - 1) * 2. The scale is rounded to `scale_dtype` *before* the
    integers are computed, so that dequantizing with the stored scale gives exactly the values
    that the search (AWQ) scored.
    """
    w = _grouped(weight.float(), group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = w.abs().amax(-1) / ((qmax - qmin) / 2)
        scale = scale.clamp(min=1e-8).to(scale_dtype)
        q = torch.round(w / scale.float().unsqueeze(-1)).clamp(qmin, qmax)
        zero = None
    else:
        low = w.amin(-1).clamp(max=0)
        high = w.amax(-1).clamp(min=0)
        scale = ((high - low) / (qmax - qmin)).clamp(min=1e-8).to(scale_dtype)
        s = scale.float()
        zero = torch.round(qmin - low / s).clamp(qmin, qmax)
        q = (torch.round(w / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(qmin, qmax)
        zero = zero.to(torch.int8)
    return QuantizedWeight(q.reshape(weight.shape).to(torch.int8), scale, zero, bits, group_size)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(q - zero) * scale, broadcast over each group, in `dtype`."""
    values = _grouped(q, group_size).to(dtype)
    if zero is not None:
        values = values - zero.to(dtype).unsqueeze(-1)
    return (values * scale.to(dtype).unsqueeze(-1)).reshape(q.shape)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """The weight as the quantized model will see it (quantize, then dequantize), in its dtype."""
    return quantize(weight, bits, group_size, symmetric, scale_dtype).dequantize(weight.dtype)


# ---------------------------------------------------------------- int32 packing


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned b-bit integers along the last dim, 32/b per int32 (element j at bits b*j).

    A last dim that is not a multiple of 32/b is zero-padded, as compressed-tensors does.
    """
    per_word = 32 // bits
    rows, cols = values.shape
    pad = -cols % per_word
    v = torch.nn.functional.pad(values.to(torch.int32), (0, pad)).reshape(rows, -1, per_word)
    packed = torch.zeros(v.shape[:2], dtype=torch.int32, device=values.device)
    for j in range(per_word):
        packed |= v[..., j] << (bits * j)
    return packed


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: unsigned integers (int32) [rows, cols]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(packed.shape[0], -1)[:, :cols]


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors `weight_packed`: signed q [out, in] -> int32 [out, in * b / 32]."""
    return pack(q.to(torch.int32) + 2 ** (bits - 1), bits)


def unpack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return (unpack(packed, bits, in_features) - 2 ** (bits - 1)).to(torch.int8)


def pack_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors `weight_zero_point`: signed [out, groups] packed along dim 0."""
    return pack(zero.t().to(torch.int32) + 2 ** (bits - 1), bits).t().contiguous()


def unpack_zero(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return (unpack(packed.t().contiguous(), bits, out_features) - 2 ** (bits - 1)).t().to(torch.int8).contiguous()


# ---------------------------------------------------------------- AutoAWQ GEMM layout


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit [rows, cols] -> AutoAWQ's int32 [rows, cols / 8], columns interleaved."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_ORDER, device=values.device)
    return pack(values.reshape(rows, cols // 8, 8)[..., order].reshape(rows, cols), 4)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    rows, words = packed.shape
    inverse = torch.tensor(AWQ_INVERSE, device=packed.device)
    return unpack(packed, 4, words * 8).reshape(rows, words, 8)[..., inverse].reshape(rows, words * 8)
