"""The demo VLMs with images through llama.cpp (the llamacpp backend on `edgelmm export gguf
--mmproj`) against the torch backend, on the CPU: answers, accuracy and speed, same prompts and
images, one process.

For each demo model the language model is exported at every `--outtype` (f32, f16, q8_0, and
llama.cpp's own q4_0 / q4_k_m) and the vision tower + projector once in f32 and once in f16 (f16
goes with the f16 and quantized language models). Then, through `edgelmm.load`:

* parity: `--samples` shapes-vqa questions (evaluation seed 0), greedy: each engine's accuracy,
  how many answers are identical to the torch backend's, and the median time to answer a
  question end to end (the result's own e2e: prompt, vision encoder, prefill, decode);
* speed: `--speed-samples` captions (seed 1; longer answers, so decode is measured), after
  `--warmup` requests: TTFT p50 (the result's own time to first token: prompt, vision encoder,
  prefill) and TPOT p50, per engine.

    PYTHONPATH=src python benchmarks/engines/multimodal.py --out benchmarks/engines/results/multimodal-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.demo import shapes
from edgelmm.export.gguf import export_gguf
from edgelmm.export.mmproj import export_mmproj
from edgelmm.utils.io import atomic_write_text

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def engines(model: str, work: Path, threads: int) -> dict[str, ModelSpec]:
    work.mkdir(parents=True, exist_ok=True)
    projectors = {t: export_mmproj(model, work / f"{model}-mmproj-{t}.gguf", t, overwrite=True).path for t in ("f32", "f16")}
    specs = {"torch fp32": ModelSpec(path=model, device="cpu", dtype="float32")}
    for outtype in TYPES:
        lm = export_gguf(model, work / f"{model}-{outtype}.gguf", outtype, overwrite=True).path
        projector = projectors["f32" if outtype == "f32" else "f16"]
        specs[f"llamacpp {outtype}"] = ModelSpec(path=str(lm), options={"mmproj": str(projector), "n_threads": threads})
    return specs


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    questions = shapes.generate(args.samples, 0, task="vqa")
    captions = shapes.generate(args.speed_samples + args.warmup, 1, task="caption")
    greedy = SamplingParams(max_new_tokens=24)
    long = SamplingParams(max_new_tokens=64)
    answers: dict[str, list[str]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, spec in engines(model, args.work, args.threads).items():
        backend = load(spec, backend="torch" if name.startswith("torch") else "llamacpp")
        with backend:
            answered = [backend.generate([Request.chat(q.question, [q.image])], greedy)[0] for q in questions]
            texts = [r.text.strip() for r in answered]
            for c in captions[: args.warmup]:
                backend.generate([Request.chat(c.question, [c.image])], long)
            timed = [backend.generate([Request.chat(c.question, [c.image])], long)[0] for c in captions[args.warmup:]]
        answers[name] = texts
        tpot = [r.timings.tpot_s for r in timed if r.timings.tpot_s is not None]
        rows[name] = {
            "accuracy": sum(t == q.answer for t, q in zip(texts, questions)) / len(questions),
            "question_e2e_p50_ms": statistics.median(r.timings.e2e_s for r in answered) * 1e3,
            "ttft_p50_ms": statistics.median(r.timings.ttft_s for r in timed) * 1e3,
            "tpot_p50_ms": statistics.median(tpot) * 1e3 if tpot else None,
            "decode_steps": sum(len(r.timings.decode_s) for r in timed),
            "visual_tokens": timed[0].counts.visual_tokens,
        }
    reference = answers["torch fp32"]
    for name, texts in answers.items():
        rows[name]["identical_to_torch"] = sum(a == b for a, b in zip(texts, reference))
        rows[name]["differing_examples"] = [
            {"question": q.question, "answer": q.answer, "torch": r, "this": t}
            for q, r, t in zip(questions, reference, texts) if r != t][:5]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/multimodal-gguf"))
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--speed-samples", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    record = {
        "command": "python benchmarks/engines/multimodal.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "models": {m: run_model(m, args) for m in ("shapes-vlm-s", "shapes-vlm-l")},
    }
    record["wall_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=2) + "\n")
    lines = [f"# Demo VLMs with images: torch vs llama.cpp ({record['machine']})", "", f"`{record['command']}`", "",
             f"shapes-vqa: {args.samples} questions, greedy; speed: {args.speed_samples} captions after {args.warmup} "
             "warm-up requests, TTFT includes the vision encoder", "",
             "| model | engine | accuracy % | identical to torch | question e2e p50 ms | caption TTFT p50 ms | TPOT p50 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, rows in record["models"].items():
        for name, row in rows.items():
            tpot = "-" if row["tpot_p50_ms"] is None else f"{row['tpot_p50_ms']:.2f}"
            lines.append(f"| {model} | {name} | {100 * row['accuracy']:.1f} | {row['identical_to_torch']}/{args.samples} | "
                         f"{row['question_e2e_p50_ms']:.1f} | {row['ttft_p50_ms']:.1f} | {tpot} |")
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
