"""QuantLinear computes with its packed weights, and weight_bytes counts what is resident."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.methods.quantization import QuantLinear, weight_bytes


@pytest.mark.parametrize(("bits", "symmetric", "bias"), [(4, False, True), (4, True, False), (8, False, False)])
def test_forward_is_the_matmul_with_the_dequantized_weight(bits: int, symmetric: bool, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 40, bias=bias)
    layer = QuantLinear.from_linear(linear, bits, 64, symmetric)
    x = torch.randn(3, 5, 256)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    error = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert error < (0.12 if bits == 4 else 0.01)  # uniform random weights: the hardest case for rounding


def test_storage_is_packed_integers_scales_and_zero_points() -> None:
    layer = QuantLinear.from_linear(nn.Linear(512, 64, bias=False), 4, 128, False)
    assert layer.weight_packed.dtype == torch.int32 and layer.weight_packed.shape == (64, 64)
    assert layer.weight_scale.shape == (64, 4)
    assert layer.weight_zero_point.shape == (8, 4)
    assert layer.weight_shape.tolist() == [64, 512]
    assert weight_bytes(layer) == 64 * 64 * 4 + 64 * 4 * 4 + 8 * 4 * 4 + 2 * 8
    assert not any(p.is_floating_point() and p.numel() == 64 * 512 for p in layer.state_dict().values())


def test_weight_bytes_counts_each_storage_once() -> None:
    embed = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = embed.weight  # tied, as many LMs are
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert weight_bytes(model) == 100 * 16 * 4
    view_holder = nn.Module()
    view_holder.register_buffer("part", torch.zeros(1000)[:10])  # a view keeps its whole storage alive
    assert weight_bytes(view_holder) == 1000 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA only")
@pytest.mark.parametrize("kernel", ["auto", "tinygemm", "splitk", "triton"])
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_cuda_forward_matches_dequantize_and_matmul(rows: int, kernel: str) -> None:
    linear = nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, 4, 128, False)
    reference_state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    layer.settle(x.device, kernel)
    for _ in range(2):  # the split-K kernel leaves its workspace clean for the next call
        assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-2
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in reference_state.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA only")
@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("rows", [17, 300])
def test_cuda_prefill_dequantizes_exactly(rows: int, bits: int, symmetric: bool) -> None:
    import edgelmm.methods.quantization.dequant as dequant

    linear = nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, bits, 128, symmetric)
    assert torch.equal(dequant.dequantize(layer, torch.bfloat16), layer.dequantize(torch.bfloat16))
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-2
