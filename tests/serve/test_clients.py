"""Clients nobody here wrote, against `edgelmm serve` on 127.0.0.1, on small local task files:
lm-evaluation-harness (`local-completions` loglikelihood and perplexity, `local-chat-completions`
generation) scores exactly as its own `hf` backend scores the same checkpoint, and EvalScope's
OpenAI-API evaluation of a VLM with images answers as transformers does run directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

from edgelmm import ModelSpec  # noqa: E402
from edgelmm.serve import BackgroundServer, build  # noqa: E402
from tests.tiny_models import CORPUS, save_tiny  # noqa: E402

MODEL = "tiny-qwen2"


def write_tasks(root: Path) -> Path:
    """Three lm-eval tasks over local JSONL files (nothing is downloaded)."""
    root.mkdir(parents=True, exist_ok=True)
    colors = ["red", "blue", "green", "yellow"]
    mc = [{"question": f"What color is circle number {i}?", "choices": colors, "label": i % 4} for i in range(16)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    qa = [{"question": q, "answer": "red"} for q in ("What color is the circle?", "How many squares are there?", "Hello!")]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))

    def task(name: str, data: str, body: str) -> None:
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / data}\n"
            f"test_split: test\n{body}")

    task("edgelmm_mc", "mc.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\n'
         "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task("edgelmm_ppl", "text.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n")
    task("edgelmm_gen", "qa.jsonl", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         'generation_kwargs:\n  until: ["\\n\\n", "Question:", "</s>", "<|im_end|>", "###"]\n  max_gen_toks: 8\n'
         "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    path = save_tiny("qwen2", root / MODEL)
    from lm_eval.tasks import TaskManager

    return path, TaskManager(include_path=str(write_tasks(root / "tasks")))


def evaluate(model: str, model_args: str, tasks: list[str], manager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   log_samples=True, **kwargs)


def responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def reference(setup):
    path, manager = setup
    return evaluate("hf", f"pretrained={path},dtype=float32,device=cpu", ["edgelmm_mc", "edgelmm_ppl"], manager, batch_size=1)


@pytest.mark.parametrize("tokenizer, tokenized", [("huggingface", True), ("huggingface", False), ("auto", True)])
def test_lm_eval_loglikelihood_and_perplexity_equal_its_hf_backend(setup, reference, tokenizer, tokenized):
    """Through the server, with prompts batched (lists of prompts) and a model that ends every
    answer with its end token: the case where dropping that token scored every choice wrong.
    With no tokenizer given, lm-eval finds the server's /tokenize and tokenizes there."""
    path, manager = setup
    app, engine = build(ModelSpec(path=str(path), device="cpu"), served_name=MODEL)
    model = engine.backend.model
    eos = engine.backend.adapter.eos_token_ids()[0]

    def end_every_answer(module, args, logits):  # the next token after any prompt is the end token
        logits = logits.clone()
        logits[:, -1, eos] += 1e4
        return logits

    hook = model.lm_head.register_forward_hook(end_every_answer)
    try:
        with BackgroundServer(app) as server:
            local = f",tokenizer={path}" if tokenizer == "huggingface" else ""
            args = (f"base_url={server.url}/v1/completions,model={MODEL},tokenizer_backend={tokenizer}{local},"
                    f"tokenized_requests={tokenized},batch_size=4,max_length=256,num_concurrent=1,max_retries=1")
            served = evaluate("local-completions", args, ["edgelmm_mc", "edgelmm_ppl"], manager)
    finally:
        hook.remove()
        engine.close()
    mc, mc_ref = served["results"]["edgelmm_mc"], reference["results"]["edgelmm_mc"]
    assert mc["acc,none"] == mc_ref["acc,none"] and mc["acc_norm,none"] == mc_ref["acc_norm,none"]
    for ours, theirs in zip(responses(served, "edgelmm_mc"), responses(reference, "edgelmm_mc")):
        assert [r[0][0] for r in ours] == pytest.approx([r[0][0] for r in theirs], abs=1e-4)  # each choice's loglikelihood
        assert [r[0][1] for r in ours] == [r[0][1] for r in theirs]  # is_greedy
    ppl, ppl_ref = served["results"]["edgelmm_ppl"], reference["results"]["edgelmm_ppl"]
    for key in ("word_perplexity,none", "byte_perplexity,none"):
        assert ppl[key] == pytest.approx(ppl_ref[key], rel=1e-5)


def test_lm_eval_chat_generation_equals_its_hf_backend(setup):
    path, manager = setup
    reference = evaluate("hf", f"pretrained={path},dtype=float32,device=cpu", ["edgelmm_gen"], manager, batch_size=1,
                         apply_chat_template=True)
    app, engine = build(ModelSpec(path=str(path), device="cpu"), served_name=MODEL)
    try:
        with BackgroundServer(app) as server:
            args = f"base_url={server.url}/v1/chat/completions,model={MODEL},num_concurrent=1,max_retries=1"
            served = evaluate("local-chat-completions", args, ["edgelmm_gen"], manager, apply_chat_template=True)
    finally:
        engine.close()
    assert responses(served, "edgelmm_gen") == responses(reference, "edgelmm_gen")
    assert served["results"]["edgelmm_gen"]["exact_match,none"] == reference["results"]["edgelmm_gen"]["exact_match,none"]


def test_evalscope_vqa_with_images_answers_as_transformers_does(tmp_path, monkeypatch):
    """EvalScope's general_vqa (OpenAI chat, local image files) on the trained demo VLM."""
    evalscope = pytest.importorskip("evalscope")
    from evalscope.benchmarks.general_qa_vqa_metrics import calculate_metric_score
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelmm.demo import checkpoint_path
    from edgelmm.demo.shapes import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    samples = generate(8, seed=5)
    rows = []
    for i, sample in enumerate(samples):
        sample.image.save(data / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(data / f"{i}.png")}}, {"type": "text", "text": sample.question}]}],
            "answer": sample.answer})
    (data / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    app, engine = build(ModelSpec(path="shapes-vlm-s", device="cpu"), served_name="shapes-vlm-s")
    try:
        with BackgroundServer(app) as server:
            task = evalscope.TaskConfig(
                model="shapes-vlm-s", api_url=server.url + "/v1", api_key="none", eval_type="openai_api",
                datasets=["general_vqa"], work_dir=str(tmp_path / "out"), eval_batch_size=2,
                dataset_args={"general_vqa": {"local_path": str(data), "subset_list": ["shapes"], "metric_list": ["Rouge"]}},
                generation_config={"temperature": 0, "max_tokens": 8},
            )
            report = evalscope.run_task(task)["general_vqa"]
    finally:
        engine.close()
    [predictions] = list((tmp_path / "out").glob("*/reviews/shapes-vlm-s/general_vqa_shapes.jsonl"))
    reviews = sorted((json.loads(line) for line in predictions.read_text().splitlines()), key=lambda r: r["index"])
    answers = [r["sample_score"]["score"]["prediction"] for r in reviews]

    path = checkpoint_path("shapes-vlm-s")  # transformers alone, no edgelmm code on the way
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    direct = []
    for sample in samples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[sample.image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        direct.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert answers == direct
    rouge = [calculate_metric_score("Rouge", a, s.answer)["Rouge-L-R"] for a, s in zip(direct, samples)]
    [score] = [m.score for m in report.metrics if m.identity.name == "rouge" and m.identity.dimensions.get("variant") == "l"
               and m.identity.dimensions.get("statistic") == "recall"]
    assert score == pytest.approx(sum(rouge) / len(rouge), abs=1e-4)
