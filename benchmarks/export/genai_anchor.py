"""Anchor: onnxruntime-genai's own model builder beside `edgelmm export onnx`, on the demo
language model (shapes-vlm-s's Llama, saved alone as a LlamaForCausalLM checkpoint: the builder
takes no LLaVA), CPU, fp32, same prompts (the token ids of shapes-caption questions' text turns).

Each engine decodes greedily, `--new` tokens from each prompt after `--warmup` prompts: the
torch backend (edgelmm.load), the onnx backend on our export, and onnxruntime-genai's
Generator on the builder's export. Recorded: answers token-identical to torch's, TTFT p50 (the
prompt in, first token out) and TPOT p50.

onnxruntime-genai is not an edgelmm dependency: install it beside for this run
(`pip install onnxruntime-genai`).

    PYTHONPATH=src python benchmarks/export/genai_anchor.py --out benchmarks/export/results/genai-anchor
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.demo import checkpoint_path, shapes
from edgelmm.export.onnx import export_onnx
from edgelmm.utils.io import atomic_write_text


def language_model_alone(model: str, out: Path) -> Path:
    """The demo VLM's language model and tokenizer as a plain Llama checkpoint."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    vlm = LlavaForConditionalGeneration.from_pretrained(checkpoint_path(model), dtype=torch.float32)
    lm = LlamaForCausalLM(vlm.config.text_config)
    lm.model.load_state_dict(vlm.model.language_model.state_dict())
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    lm.generation_config = vlm.generation_config
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint_path(model)).save_pretrained(out)
    return out


def genai_decode(model: Any, og: Any, ids: list[int], new: int) -> tuple[list[int], float, list[float]]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    t0 = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out, stamps = [], []
    while not generator.is_done() and len(out) < new:
        generator.generate_next_token()
        stamps.append(time.perf_counter())
        out.append(int(generator.get_next_tokens()[0]))
    return out, stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    import onnxruntime_genai as og

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/genai-anchor"))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    lm = language_model_alone("shapes-vlm-s", args.work / "lm")
    ours = export_onnx(str(lm), args.work / "edgelmm.onnx", overwrite=True).path
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(lm), "-o", str(args.work / "genai"),
               "-p", "fp32", "-e", "cpu", "-c", str(args.work / "cache")]
    built = subprocess.run(builder, capture_output=True, text=True)
    record: dict[str, Any] = {
        "command": "python benchmarks/export/genai_anchor.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime-genai {og.__version__}",
        "builder": " ".join(builder[1:]), "builder_rc": built.returncode, "builder_tail": (built.stdout + built.stderr)[-2000:],
    }
    questions = shapes.generate(args.prompts + args.warmup, 1, task="caption")
    torch_engine = load(ModelSpec(path=str(lm), device="cpu", dtype="float32"))
    prompts = [torch_engine.prompt_token_ids(Request.chat(q.question)) for q in questions]
    greedy = SamplingParams(max_new_tokens=args.new, temperature=0.0)
    rows: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[list[int]]] = {}

    def summarise(name: str, outs: list[tuple[list[int], float, list[float]]]) -> None:
        answers[name] = [o[0] for o in outs]
        steps = [s for o in outs for s in o[2]]
        rows[name] = {"ttft_p50_ms": statistics.median(o[1] for o in outs) * 1e3,
                      "tpot_p50_ms": statistics.median(steps) * 1e3 if steps else None, "decode_steps": len(steps)}

    for name, engine in (("torch", torch_engine), ("edgelmm onnx", load(ModelSpec(path=str(ours), options={"threads": args.threads}),
                                                                        backend="onnx"))):
        runs = [engine.generate([Request(token_ids=ids)], greedy)[0] for ids in prompts]
        summarise(name, [(r.token_ids, r.timings.ttft_s, r.timings.decode_s) for r in runs[args.warmup:]])
    if built.returncode == 0:
        config = og.Config(str(args.work / "genai"))
        model = og.Model(config)
        runs = [genai_decode(model, og, ids, args.new) for ids in prompts]
        summarise("onnxruntime-genai", runs[args.warmup:])
    reference = answers["torch"]
    for name, row in rows.items():
        row["identical_to_torch"] = sum(a == b for a, b in zip(answers[name], reference))
    record["engines"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=2) + "\n")
    lines = [f"# Anchor: onnxruntime-genai's model builder vs edgelmm export onnx ({record['machine']})", "",
             f"`{record['command']}`", "", f"builder: `{record['builder']}` (exit {built.returncode})", "",
             f"shapes-vlm-s's language model alone, {args.prompts} caption-question text prompts after {args.warmup} warm-ups, "
             f"greedy, {args.new} new tokens", "", "| engine | identical to torch | TTFT p50 ms | TPOT p50 ms |", "| --- | ---: | ---: | ---: |"]
    for name, row in rows.items():
        tpot = "-" if row["tpot_p50_ms"] is None else f"{row['tpot_p50_ms']:.3f}"
        lines.append(f"| {name} | {row['identical_to_torch']}/{args.prompts} | {row['ttft_p50_ms']:.2f} | {tpot} |")
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
