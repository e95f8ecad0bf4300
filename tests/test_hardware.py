"""Hardware profiles and the memory / roofline planner, checked against the real transformers classes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from edgelmm.config import HardwareProfile
from edgelmm.errors import EdgelmmError
from edgelmm.hardware import format_plan, guess_profile, list_profiles, load_profile, plan, plan_from_path, roofline_decode_tok_s
from edgelmm.hardware.planning import GROUP_SIZE, architecture, bits_per_weight
from edgelmm.hardware.profiles import PROFILE_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
MODELS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
QWEN2_VL = FIXTURES / "Qwen2-VL-7B-Instruct"


def raw(model: str) -> dict:
    return json.loads((FIXTURES / model / "config.json").read_text())


# ---------------------------------------------------------------- profiles


def test_required_profiles_exist():
    required = {"jetson_orin_nx_16gb", "jetson_agx_orin_64gb", "jetson_thor", "rtx_4090", "h100_sxm", "h200", "cpu"}
    assert required <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_loads(name):
    profile = load_profile(name)
    assert isinstance(profile, HardwareProfile) and profile.name == name
    assert profile.usable_bytes < profile.memory.capacity_gb * 1e9
    assert profile.memory.bandwidth_gbs > 0 and profile.match and profile.sources
    c = profile.compute
    assert c.bf16_tflops or c.fp16_tflops or c.fp32_tflops  # prefill needs a compute figure
    if profile.kind == "soc":  # Jetsons: eager by default, unified memory shared with the OS
        assert profile.engine.enforce_eager and profile.memory.usable_fraction < 0.9


def test_unknown_profile_lists_available():
    with pytest.raises(EdgelmmError, match=r"unknown hardware profile 'tpu9'.*h100_sxm.*jetson_orin_nx_16gb"):
        load_profile("tpu9")


def copy_profile(tmp_path: Path, edit) -> Path:
    text = (PROFILE_DIR / "h100_sxm.yaml").read_text()
    path = tmp_path / "h100_sxm.yaml"
    path.write_text(edit(text))
    return path


def test_profile_unknown_key_names_file_and_key(tmp_path):
    path = copy_profile(tmp_path, lambda t: t.replace("  bandwidth_gbs:", "  bandwith_gbs:"))
    with pytest.raises(EdgelmmError, match=r"h100_sxm\.yaml.*unknown key 'memory\.bandwith_gbs'"):
        load_profile(path)


def test_profile_wrong_type_names_file_and_key(tmp_path):
    path = copy_profile(tmp_path, lambda t: t.replace("capacity_gb: 80", "capacity_gb: lots"))
    with pytest.raises(EdgelmmError, match=r"h100_sxm\.yaml.*key 'memory\.capacity_gb'.*'lots'"):
        load_profile(path)


def test_profile_name_must_match_its_file(tmp_path):
    path = copy_profile(tmp_path, lambda t: t)
    shutil.move(path, tmp_path / "my_h100.yaml")
    with pytest.raises(EdgelmmError, match=r"my_h100\.yaml: key 'name' is 'h100_sxm'"):
        load_profile(tmp_path / "my_h100.yaml")


@pytest.mark.parametrize(
    ("device", "memory_gb", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", None, "h100_sxm"),
        ("NVIDIA H200", None, "h200"),
        ("NVIDIA GeForce RTX 4090", None, "rtx_4090"),
        ("NVIDIA Thor", None, "jetson_thor"),
        ("Orin", 15.2, "jetson_orin_nx_16gb"),  # every Orin module reports "Orin": memory decides
        ("Orin", 61.4, "jetson_agx_orin_64gb"),
        ("Orin", None, "jetson_orin_nx_16gb"),  # unknown memory: the smaller, conservative profile
        ("cpu", None, "cpu"),
        (torch.device("cpu"), None, "cpu"),
    ],
)
def test_guess_profile(device, memory_gb, expected):
    assert guess_profile(device, memory_gb).name == expected


def test_guess_profile_unknown_device_is_none():
    assert guess_profile("Tesla T4") is None


# ---------------------------------------------------------------- parameter counts


def meta_counts(model: str, tied: bool) -> tuple[int, int]:
    """(vision tower + projector, language model) parameters of the real transformers class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(FIXTURES / model)
    config.tie_word_embeddings = tied  # the checkpoint's tying, which the planner resolves (InternVL)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        module = auto.from_config(config)
    total = sum(p.numel() for p in module.parameters())
    vision = sum(
        p.numel()
        for name in ("visual", "vision_tower", "multi_modal_projector")
        if hasattr(module.model, name)
        for p in getattr(module.model, name).parameters()
    )
    return vision, total - vision


@pytest.mark.parametrize("model", MODELS)
def test_param_counts_match_transformers_on_meta(model):
    arch = architecture(raw(model))
    vision, lm = meta_counts(model, arch.text.tied)
    planned_vision = arch.vision.params if arch.vision else 0
    assert planned_vision == pytest.approx(vision, rel=0.02)
    assert arch.text.params == pytest.approx(lm, rel=0.02)


@pytest.mark.parametrize(
    ("model", "billions"),
    [  # totals published on the model cards / safetensors metadata
        ("Qwen2-VL-7B-Instruct", 8.29),
        ("Qwen2.5-VL-7B-Instruct", 8.29),
        ("Qwen3-VL-8B-Instruct", 8.77),
        ("llava-1.5-7b-hf", 7.06),
        ("InternVL3-8B-hf", 7.94),  # untied lm_head, as the checkpoint stores it
        ("Llama-3.1-8B", 8.03),
        ("Qwen2.5-7B-Instruct", 7.62),
        ("Qwen3-8B", 8.19),
    ],
)
def test_totals_match_published_sizes(model, billions):
    p = plan(FIXTURES / model, "h100_sxm")
    assert (p.vision_params + p.lm_params) / 1e9 == pytest.approx(billions, abs=0.01)


def test_every_fixture_has_a_test():
    assert len(MODELS) == 8


# ---------------------------------------------------------------- memory


def test_qwen2_vl_7b_needs_4_bits_on_orin_nx():
    bf16 = plan(QWEN2_VL, "jetson_orin_nx_16gb", weight_bits=16)
    int4 = plan(QWEN2_VL, "jetson_orin_nx_16gb", weight_bits=4)
    assert not bf16.fits and bf16.margin_bytes < 0
    assert int4.fits and int4.margin_bytes > 0
    assert "DOES NOT FIT by" in format_plan(bf16) and "FITS," in format_plan(int4)


def test_kv_cache_by_hand():
    # Qwen2-VL-7B: 28 layers, 4 KV heads of 128 dims, K and V, 2 bytes each
    p = plan(QWEN2_VL, "jetson_orin_nx_16gb", context=2048, batch=3)
    assert p.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert p.kv_bytes == 57344 * 2048 * 3
    # Llama-3.1-8B: 32 layers x 8 KV heads x 128
    assert plan(FIXTURES / "Llama-3.1-8B", "cpu").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_quantized_weights_by_hand():
    """Linear layers at 4 bits plus an fp16 scale and a 4-bit zero per 128 weights; the rest 16-bit."""
    assert bits_per_weight(4) == 4 + 20 / GROUP_SIZE and bits_per_weight(16) == 16
    p = plan(FIXTURES / "Qwen2.5-7B-Instruct", "rtx_4090", weight_bits=4)
    rest = p.lm_params - p.lm_linear_params  # embeddings, lm_head, biases, norms
    assert p.lm_weight_bytes == round(p.lm_linear_params * 4.15625 / 8) + 2 * rest
    assert plan(QWEN2_VL, "rtx_4090", weight_bits=4).vision_weight_bytes == 2 * 675_759_104


def test_default_prompt_and_context():
    p = plan(QWEN2_VL, "jetson_orin_nx_16gb")
    assert (p.text_tokens, p.vision_tokens) == (128, 256)  # a 448 x 448 image: 32 x 32 patches, 2 x 2 merge
    assert p.context == 4096  # the profile's max_context
    assert plan(FIXTURES / "llava-1.5-7b-hf", "h100_sxm").context == 4096  # capped at the model's window
    assert plan(FIXTURES / "llava-1.5-7b-hf", "h100_sxm").vision_tokens == 576
    assert plan(FIXTURES / "InternVL3-8B-hf", "h100_sxm").vision_tokens == 256
    assert plan(FIXTURES / "Qwen3-8B", "h100_sxm").vision_tokens == 0


# ---------------------------------------------------------------- roofline


def test_roofline_is_positive_and_orders_devices():
    orin = plan(QWEN2_VL, "jetson_orin_nx_16gb", weight_bits=4, context=4096)
    h100 = plan(QWEN2_VL, "h100_sxm", weight_bits=4, context=4096)
    assert 0 < orin.decode_tok_s < h100.decode_tok_s
    assert orin.prefill_s > h100.prefill_s > 0
    # decode at batch 1 is bandwidth-bound: the bytes streamed per token over the bandwidth
    streamed = orin.lm_weight_bytes - 2 * 152064 * 3584 + orin.kv_bytes  # the input embedding is not read
    assert orin.decode_tok_s == pytest.approx(102.4e9 / streamed)
    assert plan(QWEN2_VL, "jetson_orin_nx_16gb", weight_bits=16).decode_tok_s < orin.decode_tok_s


def test_roofline_helper_takes_a_loaded_models_config():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(QWEN2_VL)
    tok_s = roofline_decode_tok_s(config, "jetson_orin_nx_16gb", weight_bits=16, context=600)
    assert tok_s == pytest.approx(plan(QWEN2_VL, "jetson_orin_nx_16gb", context=600).decode_tok_s)


def test_plan_serialises():
    p = plan_from_path(QWEN2_VL, "jetson_orin_nx_16gb", weight_bits=4, context=1024, batch=2)
    data = json.loads(json.dumps(p.to_dict()))
    assert data["fits"] is True and data["total_bytes"] == p.total_bytes and data["batch"] == 2
    assert "for the batch" in format_plan(p)


# ---------------------------------------------------------------- errors


def test_directory_without_config_json(tmp_path):
    with pytest.raises(EdgelmmError, match="no config.json"):
        plan_from_path(tmp_path, "cpu")


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(EdgelmmError, match=r"model_type 'mamba' is not known.*internvl.*qwen2_vl"):
        plan(tmp_path, "cpu")


def test_bad_inputs_are_clear():
    with pytest.raises(EdgelmmError, match="weight_bits must be one of"):
        plan(QWEN2_VL, "cpu", weight_bits=3)
    with pytest.raises(EdgelmmError, match="has no vision tower"):
        plan(FIXTURES / "Qwen3-8B", "cpu", vision_tokens=256)
    with pytest.raises(EdgelmmError, match=r"\(128 text \+ 576 visual tokens\) is longer than the context \(512\)"):
        plan(FIXTURES / "llava-1.5-7b-hf", "cpu", context=512)
