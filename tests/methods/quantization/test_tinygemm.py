"""The tinygemm layout: torch's int4 kernel computes our (q - z) · s weights, and the checkpoint
tensors survive the round trip bit for bit. Run on the CPU twin of the CUDA kernel
(`_weight_int4pack_mm_for_cpu`), which has the same scales-and-zeros convention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgelmm.methods.quantization import QuantLinear, prepare, tinygemm, weight_bytes

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch without int4pack ops")


def make_layer(symmetric: bool = False, bias: bool = True, out: int = 48, inp: int = 256, group: int = 64) -> QuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(inp, out, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.add_(0.05)  # groups off-centre: zero points far from 0, so their sign and offset matter
    return QuantLinear.from_linear(linear, 4, group, symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_output_is_the_matmul_with_our_dequantized_weight(symmetric: bool) -> None:
    layer = make_layer(symmetric)
    assert symmetric or layer.int_weight().zero.abs().max() >= 3
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    reference = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
    layer.to_tinygemm()
    assert layer.layout == "tinygemm" and layer.weight_packed is None
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    assert float((y.double() - reference).norm() / reference.norm()) < 1e-2


def test_zero_point_convention() -> None:
    """w = (u - 8) · scale + zero in the kernel; ours is (q - z) · s with q = u - 8, so zero = -z · s.
    A wrong sign or a missing 8 · s would move every output by far more than bfloat16 rounding."""
    n, k, group = 16, 64, 32
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) + 0.5).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (n, k // group), dtype=torch.int8)
    sz = tinygemm.scales_and_zeros(scale, zero)
    assert sz.shape == (k // group, n, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 0].t(), scale)
    packed = tinygemm.pack(q.to(torch.int32) + 8, tinygemm.inner_k_tiles(k))
    eye = torch.eye(k, dtype=torch.bfloat16)
    weight = tinygemm.mm(eye, packed, group, sz).t().float()  # row i of eye reads column i of W
    ours = ((q.float() - zero.float().repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1))
    assert (weight - ours).abs().max() <= ours.abs().max() / 128  # bfloat16 rounding of the products only


@pytest.mark.parametrize("symmetric", [False, True])
def test_state_dict_is_the_checkpoint_format_bit_for_bit(symmetric: bool) -> None:
    layer = make_layer(symmetric)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to_tinygemm()
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    layer.to_packed()
    assert layer.layout == "packed" and layer.tinygemm_weight is None
    for key, tensor in before.items():
        assert torch.equal(layer.state_dict()[key], tensor), key


def test_load_state_dict_into_tinygemm_layout_and_moves() -> None:
    source, target = make_layer(), make_layer(bias=True)
    with torch.no_grad():
        source.weight_scale.mul_(2)
    target.to_tinygemm()
    target.load_state_dict(source.state_dict())
    assert target.layout == "packed" and torch.equal(target.weight_scale, source.weight_scale)
    target.to_tinygemm()
    target.to(torch.float16)  # the tiles are bfloat16-only: the layer goes back to its checkpoint tensors
    assert target.layout == "packed" and target.weight_scale.dtype == torch.float16
    source.to_tinygemm()
    source.to("cpu")  # no move: the tiles stay
    assert source.layout == "tinygemm"


def test_memory_counts_the_tiles_instead_of_the_checkpoint_tensors() -> None:
    layer = make_layer(out=64, inp=512, group=128, bias=False)
    packed_bytes = weight_bytes(layer)
    assert packed_bytes == 64 * 64 * 4 + 64 * 4 * 2 + 8 * 4 * 4 + 2 * 8
    layer.to_tinygemm()
    assert weight_bytes(layer) == 64 * 512 // 2 + 4 * 64 * 2 * 2 + 2 * 8  # int4 tiles + bf16 (scale, zero) pairs + shape
    assert all(name.startswith("tinygemm") or name == "weight_shape" for name, _ in layer.named_buffers())


def test_unsupported_layers_are_refused_and_prepare_leaves_cpu_models_alone() -> None:
    eight_bit = QuantLinear.from_linear(nn.Linear(256, 16, dtype=torch.bfloat16), 8, 64, False)
    with pytest.raises(ValueError, match="8-bit"):
        eight_bit.to_tinygemm()
    fp32_scales = QuantLinear.from_linear(nn.Linear(256, 16), 4, 64, False)
    assert "scales" in tinygemm.unsupported(fp32_scales, torch.device("cpu"))
    model = nn.Sequential(make_layer())
    assert prepare(model) == {} and model[0].layout == "packed"
