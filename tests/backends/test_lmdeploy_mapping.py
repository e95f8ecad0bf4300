"""LMDeploy cannot run on the CPU machines: these tests check what we hand it (spec and hardware
profile -> engine config, sampling -> GenerationConfig, requests -> prompts) and the errors."""

from __future__ import annotations

import importlib.util

import pytest

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams
from edgelmm.backends.lmdeploy_backend import engine_config, generation_config, prompt
from edgelmm.backends.registry import backend_class
from edgelmm.errors import MissingExtraError
from edgelmm.hardware import load_profile
from tests.tiny_models import make_image


def test_turbomind_config_from_the_profile():
    orin = load_profile("jetson_orin_nx_16gb")
    engine, args = engine_config(ModelSpec(path="OpenGVLab/InternVL2_5-2B", options={"model_format": "awq"}), orin)
    assert engine == "turbomind"
    assert args == {"session_len": orin.engine.max_context, "cache_max_entry_count": orin.engine.gpu_memory_utilization,
                    "tp": 1, "quant_policy": 0, "dtype": "auto", "model_format": "awq"}


def test_pytorch_engine_takes_eager_mode():
    engine, args = engine_config(ModelSpec(path="m", dtype="bfloat16", options={"engine": "pytorch", "session_len": 8192,
                                                                                 "enforce_eager": True, "quant_policy": 8}), None)
    assert engine == "pytorch" and args["eager_mode"] is True and "model_format" not in args
    assert (args["session_len"], args["quant_policy"], args["dtype"]) == (8192, 8, "bfloat16")


def test_bad_options():
    with pytest.raises(EdgelmmError, match="unknown lmdeploy engine"):
        engine_config(ModelSpec(path="m", options={"engine": "tensorrt"}), None)
    with pytest.raises(EdgelmmError, match="quant_policy"):
        engine_config(ModelSpec(path="m", options={"quant_policy": 2}), None)
    with pytest.raises(EdgelmmError, match="unknown option"):
        engine_config(ModelSpec(path="m", options={"session_length": 1}), None)


def test_generation_config():
    greedy = generation_config(SamplingParams(max_new_tokens=5))
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    sampled = generation_config(SamplingParams(temperature=0.8, top_k=20, seed=3, stop=["."], logprobs=True))
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.8 and sampled["top_k"] == 20
    assert (sampled["random_seed"], sampled["stop_words"], sampled["logprobs"]) == (3, ["."], 1)


def test_prompts():
    image = make_image()
    assert prompt(Request(text="hi")) == ("hi", False)
    assert prompt(Request(text="what? <image>", images=[image])) == (("what? <image>", [image]), False)
    messages, template = prompt(Request.chat("what?", [image]))
    assert template and [p["type"] for p in messages[0]["content"]] == ["image_url", "text"]
    with pytest.raises(EdgelmmError, match="not token ids"):
        prompt(Request(token_ids=[1, 2]))


@pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is not None, reason="LMDeploy is installed")
def test_missing_lmdeploy_names_the_extra():
    with pytest.raises(MissingExtraError, match=r"edgelmm\[lmdeploy\]"):
        backend_class("lmdeploy")().load(ModelSpec(path="m"))
