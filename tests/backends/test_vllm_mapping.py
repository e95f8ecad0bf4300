"""vLLM cannot run on the CPU machines: these tests check what we hand it (our spec and hardware
profile -> `vllm.LLM` arguments, our sampling -> `vllm.SamplingParams`) and the errors without it."""

from __future__ import annotations

import importlib.util

import pytest

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams
from edgelmm.backends.engines import openai_messages
from edgelmm.backends.registry import backend_class
from edgelmm.backends.vllm_backend import engine_args, engine_prompt, sampling_args
from edgelmm.errors import MissingExtraError
from edgelmm.hardware import load_profile
from tests.tiny_models import make_image


def test_engine_args_come_from_the_hardware_profile():
    orin = load_profile("jetson_orin_nx_16gb")
    args = engine_args(ModelSpec(path="Qwen/Qwen2-VL-2B-Instruct", dtype="float16"), orin)
    assert args["model"] == "Qwen/Qwen2-VL-2B-Instruct" and args["dtype"] == "float16"
    assert args["gpu_memory_utilization"] == orin.engine.gpu_memory_utilization
    assert args["max_model_len"] == orin.engine.max_context
    assert args["enforce_eager"] is orin.engine.enforce_eager
    assert args["trust_remote_code"] is False and "quantization" not in args
    assert args["limit_mm_per_prompt"] == {"image": 1}


def test_options_override_the_profile():
    spec = ModelSpec(path="m", trust_remote_code=True, options={
        "gpu_memory_utilization": 0.5, "max_model_len": 2048, "enforce_eager": False, "quantization": "awq",
        "max_images": 2, "max_num_seqs": 4})
    args = engine_args(spec, load_profile("h100_sxm"))
    assert (args["gpu_memory_utilization"], args["max_model_len"], args["enforce_eager"]) == (0.5, 2048, False)
    assert args["quantization"] == "awq" and args["max_num_seqs"] == 4 and args["trust_remote_code"] is True
    assert args["limit_mm_per_prompt"] == {"image": 2}
    assert engine_args(ModelSpec(path="m"), None)["max_model_len"] == 4096  # no profile: EngineDefaults


def test_unknown_option_is_an_error():
    with pytest.raises(EdgelmmError, match="unknown option.*gpu_mem"):
        engine_args(ModelSpec(path="m", options={"gpu_mem": 0.5}), None)


def test_sampling_args():
    assert sampling_args(SamplingParams(max_new_tokens=7)) == {
        "n": 1, "max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": None}
    args = sampling_args(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1, stop=["\n"], logprobs=True))
    assert (args["top_k"], args["stop"], args["logprobs"], args["seed"]) == (40, ["\n"], 0, 1)
    scored = sampling_args(SamplingParams(max_new_tokens=0, top_logprobs=3, prompt_logprobs=2))
    assert (scored["max_tokens"], scored["logprobs"], scored["prompt_logprobs"]) == (1, 3, 2)


def test_messages_keep_images_where_they_are():
    image = make_image()
    request = Request(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image},
                                     {"type": "text", "text": "What is it?"}]},
    ])
    system, user = openai_messages(request)
    assert system == {"role": "system", "content": "Be brief."}
    assert [part["type"] for part in user["content"]] == ["text", "image_url", "text"]
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_text_and_token_prompts():
    image = make_image()
    assert engine_prompt(Request(text="USER: <image> hi")) == {"prompt": "USER: <image> hi"}
    assert engine_prompt(Request(token_ids=[1, 2, 3], images=[image])) == {
        "prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": image}}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_names_the_extra():
    with pytest.raises(MissingExtraError, match=r"edgelmm\[vllm\]"):
        backend_class("vllm")().load(ModelSpec(path="m"))


def test_options_grouped_by_backend():
    """One model spec for a matrix over engines: each backend reads its own group."""
    spec = ModelSpec(path="m", options={"vllm": {"max_model_len": 1024}, "llamacpp": {"n_ctx": 99}})
    assert engine_args(spec, None)["max_model_len"] == 1024
    with pytest.raises(EdgelmmError, match="unknown option.*n_ctx"):
        engine_args(ModelSpec(path="m", options={"vllm": {"n_ctx": 1}}), None)
