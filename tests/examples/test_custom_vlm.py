"""The custom VLM of examples/custom_vlm, onboarded from outside the package: its own vision
encoder, projector and forward, checkpoint weights under its own names. With its plug-in module
loaded and nothing in edgelmm edited, it runs through bench (pruning and quantization included),
quantize, plan and serve, and answers exactly as the model its weights came from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import edgelmm
from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.cli import main
from edgelmm.demo.shapes import generate

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_vlm"
PLUGIN = str(EXAMPLE / "my_vlm.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("custom") / "my-vlm"
    subprocess.run([sys.executable, str(EXAMPLE / "make_weights.py"), str(out)], check=True, capture_output=True)
    edgelmm.load_plugin(PLUGIN)
    return out


def test_the_checkpoint_uses_its_own_weight_names(checkpoint):
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "llm.layers.0.attention.wq.weight" in keys and "output.weight" in keys and "mm_projector.0.weight" in keys
    assert not any(k.startswith("language_model.") for k in keys)


def test_it_answers_as_the_model_its_weights_came_from(checkpoint):
    requests = [Request.chat(s.question, [s.image]) for s in generate(12, seed=3)]
    params = SamplingParams(max_new_tokens=8, logprobs=True)
    with load(str(checkpoint), device="cpu") as mine, load("shapes-vlm-s", device="cpu") as reference:
        assert type(mine.model).__name__ == "MyVLM" and mine.adapter.family == "my_vlm"
        ours, theirs = mine.generate(requests, params), reference.generate(requests, params)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    assert [lp for r in ours for lp in r.logprobs] == pytest.approx([lp for r in theirs for lp in r.logprobs], abs=1e-4)


def test_bench_with_pruning_and_quantization(checkpoint, tmp_path, capsys):
    methods = ["none", "fastv(k=2, keep=0.25)", "divprune(k=1, keep=0.25, merge=True)", "rtn(bits=4, group_size=128)"]
    args = ["--plugin", PLUGIN, "bench", "--model", str(checkpoint), "--samples", "8", "--device", "cpu",
            "--max-new-tokens", "8", "--out", str(tmp_path)]
    assert main([*args, *(a for m in methods for a in ("--method", m))]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == methods and all(r["accuracy"] >= 0.75 for r in rows)
    assert rows[1]["counts"]["prompt_tokens"] == rows[0]["counts"]["prompt_tokens"]  # counted before pruning


def test_quantize_then_load_the_quantized_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "q"
    assert main(["--plugin", PLUGIN, "quantize", str(checkpoint), "--method", "rtn", "--group-size", "64", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "my_vlm"
    sample = generate(1, seed=3)[0]
    with load(str(out), device="cpu") as quantized:
        from edgelmm.methods.quantization import QuantLinear

        assert isinstance(quantized.adapter.attention(0).q_proj, QuantLinear)
        [answer] = quantized.generate([Request.chat(sample.question, [sample.image])], SamplingParams(max_new_tokens=8))
    assert answer.text == sample.answer


def test_plan_counts_its_parameters(checkpoint):
    from edgelmm.hardware import plan

    mine, reference = plan(checkpoint, "jetson_orin_nx_16gb"), plan("src/edgelmm/demo/checkpoints/shapes-vlm-s", "jetson_orin_nx_16gb")
    assert mine.lm_params == reference.lm_params and mine.vision_tokens == reference.vision_tokens == 144
    assert mine.vision_params == reference.vision_params - 2 * 128  # less CLIP's unused post-layernorm
    weights = sum(t.numel() for t in load(str(checkpoint), device="cpu").model.state_dict().values())
    assert mine.vision_params + mine.lm_params == weights


def test_serve(checkpoint):
    pytest.importorskip("fastapi")
    from edgelmm.serve import BackgroundServer, build
    from tests.serve.conftest import data_url

    sample = generate(1, seed=4)[0]
    app, engine = build(ModelSpec(path=str(checkpoint), device="cpu", methods=["fastv(k=2, keep=0.5)"]), served_name="my-vlm")
    try:
        with BackgroundServer(app) as server:
            answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "my-vlm", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(sample.image)}},
                    {"type": "text", "text": sample.question}]}]}).json()
    finally:
        engine.close()
    assert answer["choices"][0]["message"]["content"] == sample.answer
