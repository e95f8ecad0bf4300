"""Checkpoints: the round trip through plain transformers + compressed-tensors for every family,
the AutoAWQ layout, and refusals that leave nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization import (
    QuantLinear,
    RTNConfig,
    convert_to_awq,
    load_quantized,
    load_quantized_model,
    quantize,
    quantize_checkpoint,
    save_quantized,
)
from edgelmm.request import Request
from tests.tiny_models import FAMILIES, sample_images, save_tiny


def inputs_for(adapter) -> dict[str, torch.Tensor]:
    """A prompt with an image for a VLM (so the 16-bit vision side is exercised too), text otherwise."""
    images = [sample_images(adapter.config.model_type)[0]] if adapter.multimodal else []
    return adapter.build_inputs(Request.chat("What color is the circle?", images))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def quantized_checkpoint(fresh, family: str, path: Path, symmetric: bool, bits: int = 4):
    model, processor, adapter = fresh(family)
    quantize(model, adapter, RTNConfig(bits=bits, group_size=32, symmetric=symmetric), progress=False)
    save_quantized(model, processor, adapter, path)
    return model, adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_with_compressed_tensors_loads_it_and_agrees(fresh, tmp_path: Path, family: str) -> None:
    for symmetric in (True, False):
        path = tmp_path / f"q-{symmetric}"
        model, adapter = quantized_checkpoint(fresh, family, path, symmetric)
        inputs = inputs_for(adapter)
        ours = logits(model, inputs)
        assert torch.equal(logits(load_quantized(path), inputs), ours)  # edgelmm's own loader: bit-identical
        auto = AutoModelForImageTextToText if adapter.multimodal else AutoModelForCausalLM
        theirs = logits(auto.from_pretrained(path, dtype=torch.float32), inputs)  # no extra config, either scheme
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4), float((theirs - ours).abs().max())


def test_config_json_declares_pack_quantized(fresh, tmp_path: Path) -> None:
    quantized_checkpoint(fresh, "llava", tmp_path / "q", symmetric=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights == {**weights, "num_bits": 4, "type": "int", "symmetric": False, "group_size": 32, "strategy": "group"}
    assert config["ignore"] == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head.*"]
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "language_model.model.layers.0.self_attn.q_proj"  # LLaVA's checkpoint naming, as engines expect
    assert tensors[f"{key}.weight_packed"].dtype == torch.int32 and tensors[f"{key}.weight_zero_point"].shape == (8, 2)
    assert f"{key}.weight" not in tensors and "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in tensors


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2"])
def test_autoawq_layout_round_trip(fresh, tmp_path: Path, family: str) -> None:
    model, adapter = quantized_checkpoint(fresh, family, tmp_path / "ct", symmetric=False)
    convert_to_awq(tmp_path / "ct", tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm" and config["zero_point"]
    tensors = load_file(tmp_path / "awq" / "model.safetensors")
    qweights = [k for k in tensors if k.endswith(".qweight")]
    assert qweights and all(tensors[k.replace("qweight", "scales")].dtype == torch.float16 for k in qweights)
    assert not any(k.endswith(".weight_packed") for k in tensors)
    loaded = load_quantized(tmp_path / "awq")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == sum(isinstance(m, QuantLinear) for m in model.modules())
    inputs = inputs_for(adapter)
    ours, theirs = logits(model, inputs), logits(loaded, inputs)
    assert float((theirs - ours).norm() / ours.norm()) < 1e-3  # float16 scales: the only difference


def test_load_quantized_model_gives_a_working_backend_tuple(fresh, tmp_path: Path) -> None:
    quantized_checkpoint(fresh, "qwen2_vl", tmp_path / "q", symmetric=True)
    model, processor, adapter, device = load_quantized_model(ModelSpec(path=str(tmp_path / "q"), device="cpu"))
    assert adapter.family == "qwen2_vl" and device.type == "cpu"
    assert isinstance(adapter.attention(0).q_proj, QuantLinear) and adapter.attention(0).q_proj.symmetric
    assert torch.isfinite(logits(model, inputs_for(adapter))).all()


def test_existing_output_is_refused_and_failures_leave_nothing(fresh, tmp_path: Path) -> None:
    model, processor, adapter = fresh("qwen2")
    quantize(model, adapter, RTNConfig(group_size=32), progress=False)
    save_quantized(model, processor, adapter, tmp_path / "q")
    with pytest.raises(EdgelmmError, match="already exists"):
        save_quantized(model, processor, adapter, tmp_path / "q")
    save_quantized(model, processor, adapter, tmp_path / "q", overwrite=True)
    with pytest.raises(AttributeError):  # a processor that cannot save: fails inside the write
        save_quantized(model, object(), adapter, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial output, no temporary left
    source = save_tiny("qwen2", tmp_path / "float")
    with pytest.raises(EdgelmmError, match="already exists"):  # refused before loading anything
        quantize_checkpoint(str(source), tmp_path / "q", RTNConfig(group_size=32))
    with pytest.raises(EdgelmmError, match="already quantized"):
        quantize_checkpoint(str(tmp_path / "q"), tmp_path / "again", RTNConfig(group_size=32))


def test_corrupt_or_foreign_checkpoints_are_named(fresh, tmp_path: Path) -> None:
    quantized_checkpoint(fresh, "qwen2", tmp_path / "q", symmetric=False)

    def variant(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(tmp_path / "q", path)
        return path

    def edit_config(path: Path, **changes: object) -> None:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"].update(changes)
        (path / "config.json").write_text(json.dumps(config))

    gptq = variant("gptq")
    edit_config(gptq, quant_method="gptq")
    with pytest.raises(EdgelmmError, match="foreign quantized checkpoint \\(quant_method 'gptq'\\)"):
        load_quantized(gptq)
    naive = variant("naive")
    edit_config(naive, format="naive-quantized")
    with pytest.raises(EdgelmmError, match="format 'naive-quantized' is not supported"):
        load_quantized(naive)
    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgelmmError, match="corrupt checkpoint"):
        load_quantized(truncated)
    missing = variant("missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgelmmError, match=r"tensor .model\.layers\.1\.mlp\.up_proj\.weight_scale. is missing"):
        load_quantized(missing)
    reshaped = variant("reshaped")
    tensors = load_file(reshaped / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_packed"] = tensors["model.layers.0.self_attn.o_proj.weight_packed"][:, :4].contiguous()
    save_file(tensors, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgelmmError, match=r"'model\.layers\.0\.self_attn\.o_proj\.weight_packed' has shape \(64, 4\)"):
        load_quantized(reshaped)
    with pytest.raises(EdgelmmError, match="not a quantized checkpoint"):
        load_quantized(save_tiny("qwen2", tmp_path / "float"))


def test_awq_conversion_refuses_what_the_layout_cannot_hold(fresh, tmp_path: Path) -> None:
    quantized_checkpoint(fresh, "qwen2", tmp_path / "w8", symmetric=False, bits=8)
    with pytest.raises(EdgelmmError, match="4-bit weights only"):
        convert_to_awq(tmp_path / "w8", tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


ONE_LINER = """
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32)
assert "edgelmm" not in sys.modules
print(type(model).__name__)
"""


def test_the_plain_one_liner_loads_an_asymmetric_checkpoint_without_edgelmm(tmp_path: Path) -> None:
    """What a user runs in another process: no edgelmm import, no extra quantization config."""
    import subprocess
    import sys

    from edgelmm.cli import main

    assert main(["quantize", "shapes-vlm-s", "--method", "rtn", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["symmetric"] is False
    done = subprocess.run([sys.executable, "-c", ONE_LINER, str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "LlavaForConditionalGeneration"
