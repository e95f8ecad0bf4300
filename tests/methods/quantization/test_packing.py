"""Integer quantization and packing, checked against compressed-tensors' and AutoAWQ's own code."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

from edgelmm.methods.quantization import packing


def weights(out: int = 24, inp: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_integers_and_dequantized_values_match_compressed_tensors(bits: int, symmetric: bool) -> None:
    w = weights()
    qw = packing.quantize(w, bits, 64, symmetric, torch.float32)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=64)
    zero = qw.zero if qw.zero is not None else torch.zeros_like(qw.scale, dtype=torch.int8)
    theirs = ct_quantize(w, qw.scale, zero, args, dtype=torch.int8)
    assert torch.equal(theirs, qw.q)
    assert torch.allclose(ct_dequantize(qw.q, qw.scale, zero, args), qw.dequantize(), atol=1e-6)
    step = qw.scale.repeat_interleave(64, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()  # round to nearest: half a step at most


def test_asymmetric_range_keeps_zero_and_uses_every_level() -> None:
    w = torch.linspace(0.5, 2.0, 64).reshape(1, 64)  # all positive: the range still starts at 0
    qw = packing.quantize(w, 4, 64, False, torch.float32)
    assert int(qw.zero) == -8
    assert int(qw.q.max()) == 7


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [256, 100])
def test_weight_packing_matches_compressed_tensors(bits: int, cols: int) -> None:
    q = packing.quantize(weights(24, 256), bits, 32, False, torch.float32).q[:, :cols].contiguous()
    ours = packing.pack_weight(q, bits)
    assert torch.equal(ours, pack_to_int32(q, bits))
    assert torch.equal(packing.unpack_weight(ours, bits, cols), q)
    assert torch.equal(unpack_from_int32(ours, bits, q.shape), q)


@pytest.mark.parametrize("out", [24, 20])
def test_zero_points_pack_along_the_output_dimension_as_compressed_tensors(out: int) -> None:
    zero = packing.quantize(weights(out, 256), 4, 32, False, torch.float32).zero
    ours = packing.pack_zero(zero, 4)
    assert ours.shape == (-(-out // 8), 8)
    assert torch.equal(ours, pack_to_int32(zero, 4, packed_dim=0))
    assert torch.equal(packing.unpack_zero(ours, 4, out), zero)


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, written out as the reference."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int32) << (i * 4)
    return packed


def test_awq_layout_matches_autoawq_and_round_trips() -> None:
    values = torch.randint(0, 16, (32, 40), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    packed = packing.pack_awq(values)
    assert torch.equal(packed, autoawq_pack(values))
    assert torch.equal(packing.unpack_awq(packed), values)
