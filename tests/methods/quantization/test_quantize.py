"""quantize(): which modules change, what the memory becomes, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.methods import apply, parse_method
from edgelmm.methods.quantization import AWQConfig, QuantLinear, RTNConfig, quantize, weight_bytes


def test_only_the_language_layers_are_quantized(fresh) -> None:
    model, _, adapter = fresh("llava")
    vision = {n: p.clone() for n, p in adapter.vision_tower().named_parameters()}
    head, embed = adapter.lm_head(), adapter.embed_tokens()
    before = weight_bytes(model)
    quantize(model, adapter, RTNConfig(group_size=32), progress=False)
    for layer in adapter.language_layers():
        assert not any(type(m) is nn.Linear for m in layer.modules())
        assert sum(isinstance(m, QuantLinear) for m in layer.modules()) == 7
    assert all(type(m) is not QuantLinear for m in adapter.vision_tower().modules())
    assert all(type(m) is not QuantLinear for m in adapter.projector().modules())
    assert all(torch.equal(p, vision[n]) for n, p in adapter.vision_tower().named_parameters())
    assert adapter.lm_head() is head and type(head) is nn.Linear and adapter.embed_tokens() is embed
    # the decoder's float weights are gone: 4-bit values + group-32 scales and zero points
    linear_floats = sum(2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 for _ in adapter.language_layers()) * 4
    saved = before - weight_bytes(model)
    assert saved > 0.8 * linear_floats


def test_extra_modules_and_tied_lm_head(fresh) -> None:
    model, _, adapter = fresh("qwen2")  # untied
    quantize(model, adapter, RTNConfig(group_size=32, extra=("lm_head",)), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    model, _, adapter = fresh("gemma")  # lm_head tied to the embeddings
    with pytest.raises(EdgelmmError, match="tied"):
        quantize(model, adapter, RTNConfig(group_size=32, extra=("lm_head",)), progress=False)
    model, _, adapter = fresh("llava")
    quantize(model, adapter, RTNConfig(group_size=32, extra=("vision_tower",)), progress=False)
    assert any(isinstance(m, QuantLinear) for m in adapter.vision_tower().modules())


def test_bad_settings_are_refused_before_any_change(fresh) -> None:
    with pytest.raises(EdgelmmError, match="unsupported weight bits: 3"):
        RTNConfig(bits=3)
    with pytest.raises(EdgelmmError, match="unsupported group size"):
        RTNConfig(group_size=12)
    with pytest.raises(EdgelmmError, match="unknown module"):
        RTNConfig(extra=("embeddings",))
    with pytest.raises(EdgelmmError, match="method 'awq': unknown setting.*alpha"):
        parse_method("awq(alpha=0.5)")
    with pytest.raises(EdgelmmError, match="unknown setting.*w_bit.*did you mean 'bits'"):
        parse_method("rtn(w_bit=4)")
    model, _, adapter = fresh("qwen2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EdgelmmError, match=r"group size 256 does not divide layer 'model\.layers\.0\.self_attn\.q_proj' \(64 input"):
        quantize(model, adapter, RTNConfig(group_size=256), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(EdgelmmError, match="rtn takes no calibration"):
        quantize(model, adapter, RTNConfig(group_size=32), calibration=[], progress=False)
    with pytest.raises(EdgelmmError, match="calibration set is empty"):
        quantize(model, adapter, AWQConfig(group_size=32), calibration=[], progress=False)
    with pytest.raises(EdgelmmError, match="AWQ needs calibration data"):
        quantize(model, adapter, AWQConfig(group_size=32), progress=False)


def test_methods_are_registered_for_model_specs(fresh) -> None:
    model, _, adapter = fresh("qwen2")
    model = apply(model, adapter, "rtn(bits=8, group_size=32)")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.bits == 8 and layer.group_size == 32
    model, _, adapter = fresh("qwen2")
    spec = "awq(bits=4, group_size=32, grid=4, clip_grid=4, calibration={'source': 'shapes', 'num_samples': 2, 'max_seq_len': 32})"
    method = parse_method(spec)
    assert method.calibration.num_samples == 2 and parse_method(str(method)) == method  # the spec round-trips
    model = apply(model, adapter, method)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)
    with pytest.raises(EdgelmmError, match="unknown setting.*gird.*did you mean 'grid'"):
        apply(model, adapter, "awq(bits=4, gird=4)")
