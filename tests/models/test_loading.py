"""Registry by config.model_type, checkpoint round trips through load_model, and clear load errors."""

from __future__ import annotations

import json

import pytest
import torch

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.models import registry
from edgelmm.models.base import ModelAdapter
from edgelmm.models.causal_lm import CausalLMAdapter
from edgelmm.models.internvl import InternVLAdapter
from edgelmm.models.llava import LlavaAdapter
from edgelmm.models.loader import load_model, read_config, resolve_checkpoint, resolve_model_path
from edgelmm.models.processors import images_only
from edgelmm.models.qwen2_vl import Qwen2VLAdapter
from edgelmm.models.qwen3_vl import Qwen3VLAdapter
from edgelmm.models.registry import adapter_class, get_adapter, supported_model_types
from edgelmm.registry import MODEL_FAMILIES
from edgelmm.request import Request
from tests.tiny_models import FAMILIES, VLM_FAMILIES, sample_images, save_tiny

ADAPTER_OF = {
    "llava": LlavaAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "qwen3_vl_moe": Qwen3VLAdapter,
    "internvl": InternVLAdapter,
    **dict.fromkeys(CausalLMAdapter.model_types, CausalLMAdapter),
}


@pytest.mark.parametrize("model_type", sorted(ADAPTER_OF))
def test_registry_picks_the_adapter_by_model_type(model_type):
    assert adapter_class(model_type) is ADAPTER_OF[model_type]
    assert model_type in supported_model_types()


@pytest.mark.parametrize("family", FAMILIES)
def test_get_adapter_reads_the_model_config(tiny, family):
    _, _, adapter = tiny(family)
    assert type(adapter) is ADAPTER_OF[family]


def test_a_family_from_outside_the_package_registers_by_model_type(monkeypatch):
    class MyAdapter(ModelAdapter):
        family = "my_family"
        model_types = ("my_vlm",)

    monkeypatch.setattr(MODEL_FAMILIES, "_entries", dict(MODEL_FAMILIES._entries))
    registry.register_adapter(MyAdapter)
    assert adapter_class("my_vlm") is MyAdapter and "my_vlm" in supported_model_types()
    assert adapter_class("qwen2_vl") is Qwen2VLAdapter  # the built-ins are still there


def test_a_checkpoint_is_read_once():
    checkpoint = resolve_checkpoint("shapes-vlm-s")
    assert checkpoint.model_type == "llava" and checkpoint.adapter_cls is LlavaAdapter and checkpoint.quantization is None


def test_unknown_model_type_is_an_error_naming_it():
    with pytest.raises(EdgelmmError, match="'mamba_xl'") as exc:
        adapter_class("mamba_xl")
    assert "qwen2_vl" in exc.value.hint  # says what is supported


@pytest.mark.parametrize("model_type", CausalLMAdapter.model_types)
def test_every_causal_model_type_has_the_shared_layout(model_type):
    """The list in causal_lm.py is a claim about transformers' module layout: check each entry."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16)
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, num_key_value_heads=1, **sizes)
    adapter = get_adapter(AutoModelForCausalLM.from_config(config))
    assert len(adapter.language_layers()) == 2
    assert adapter.attention(1) is adapter.language_layers()[1].self_attn
    assert adapter.mlp(1) is adapter.language_layers()[1].mlp
    assert adapter.embed_tokens().num_embeddings == adapter.lm_head().out_features == 64


def test_images_only_drops_just_the_video_processor():
    from transformers import InternVLProcessor, Qwen2VLProcessor

    cls = images_only(Qwen2VLProcessor)
    assert issubclass(cls, Qwen2VLProcessor) and cls.__name__ == "Qwen2VLProcessor"
    assert cls.get_attributes() == ["image_processor", "tokenizer"]
    assert images_only(Qwen2VLProcessor) is cls  # one class per family
    assert images_only(InternVLProcessor).get_attributes() == ["image_processor", "tokenizer"]


def test_a_processor_remembers_the_pictures_it_processed_last(monkeypatch):
    """The demo processor (LLaVA): the same picture again is not processed again, and gives the
    same inputs; another picture, or the same one changed, is processed anew; a processor saved
    and loaded again is the family's own."""
    from PIL import Image

    from edgelmm.demo import checkpoint_path
    from edgelmm.models.processors import MEMO_IMAGES, load_processor

    processor = load_processor(checkpoint_path("shapes-vlm-xs"), "llava", True)
    inner = type(processor.image_processor)
    calls = []
    original = inner.__call__
    monkeypatch.setattr(inner, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    red, blue = Image.new("RGB", (96, 96), "red"), Image.new("RGB", (96, 96), "blue")
    text = processor.image_token + " What color?"
    first = processor(text=[text], images=[red], return_tensors="pt")
    again = processor(text=[text], images=[red.copy()], return_tensors="pt")
    assert len(calls) == 1 and torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["input_ids"], again["input_ids"])
    processor(text=[text], images=[blue], return_tensors="pt")
    red.putpixel((0, 0), (0, 0, 0))
    changed = processor(text=[text], images=[red], return_tensors="pt")
    assert len(calls) == 3 and not torch.equal(changed["pixel_values"], first["pixel_values"])
    for i in range(MEMO_IMAGES + 1):  # the oldest are forgotten
        processor(text=[text], images=[Image.new("RGB", (96, 96), (i, 0, 0))], return_tensors="pt")
    processor(text=[text], images=[blue], return_tensors="pt")
    assert len(calls) == 3 + MEMO_IMAGES + 2


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("family", FAMILIES)
def test_save_tiny_then_load_model_gives_the_same_model(tiny, tmp_path, family):
    model, processor, original = tiny(family)
    path = save_tiny(family, tmp_path / family)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    loaded, loaded_processor, adapter, device = load_model(ModelSpec(path=str(path), device="cpu"))
    assert type(adapter) is ADAPTER_OF[family] and adapter.model is loaded and adapter.processor is loaded_processor
    assert device == torch.device("cpu") and not loaded.training and loaded.dtype == torch.float32
    assert type(loaded) is type(model) and loaded_processor.chat_template == processor.chat_template
    if family in VLM_FAMILIES:  # the family's own processor class (its tokenizer class may be the family's too)
        assert type(loaded_processor).__name__ == type(processor).__name__

    images = [sample_images(family)[0]] if family in VLM_FAMILIES else []
    inputs = adapter.build_inputs(Request.chat("What color is the circle?", images))
    assert torch.equal(inputs["input_ids"], original.build_inputs(Request.chat("What color is the circle?", images))["input_ids"])
    with torch.no_grad():  # same seed, same weights: the reloaded model computes what the original does
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


# ---------------------------------------------------------------- errors


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(EdgelmmError, match="model not found"):
        load_model(ModelSpec(path=str(tmp_path / "nope"), device="cpu"))


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(EdgelmmError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_config_without_model_type_or_bad_json_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(EdgelmmError, match="no 'model_type'"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EdgelmmError, match="invalid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(EdgelmmError, match="not UTF-8"):
        read_config(tmp_path)


def test_a_corrupt_weights_file_is_one_error(tmp_path):
    path = save_tiny("qwen2", tmp_path / "qwen2")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(EdgelmmError, match=f"cannot load {path / 'model.safetensors'}: .*checkpoint is complete"):
        load_model(ModelSpec(path=str(path), device="cpu"))


def test_loading_an_unknown_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba_xl"}))
    with pytest.raises(EdgelmmError, match="unsupported model_type 'mamba_xl'"):
        load_model(ModelSpec(path=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])
def test_incomplete_checkpoint_is_an_error(tmp_path, missing):
    path = save_tiny("qwen2_vl", tmp_path / "qwen2_vl")
    (path / missing).unlink()
    with pytest.raises(EdgelmmError, match="cannot load"):
        load_model(ModelSpec(path=str(path), device="cpu"))
