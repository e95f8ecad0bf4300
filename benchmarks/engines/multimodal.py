"""The demo VLMs with images through llama.cpp (the llamacpp backend on `edgelmm export gguf
--mmproj`) and ONNX Runtime (the onnx backend on `edgelmm export onnx`) against the torch
backend, on the CPU: answers, accuracy and speed, same prompts and images, one process.

For each demo model the language model is exported at every `--outtype` (f32, f16, q8_0, and
llama.cpp's own q4_0 / q4_k_m) and the vision tower + projector once in f32 and once in f16 (f16
goes with the f16 and quantized language models); the whole VLM is exported to ONNX in fp32; and
the model is quantized once with AWQ (W4A16, group 128, the demo calibration), run by the torch
backend and exported to ONNX with its int4 weights kept (MatMulNBits). Then, through `edgelmm.load`:

* parity: `--samples` shapes-vqa questions (evaluation seed 0), greedy: each engine's accuracy,
  how many answers are identical to its reference's (torch fp32; for onnx int4, torch W4A16),
  the largest difference between their log-probabilities of the same answer tokens, and the
  median time to answer a question end to end (the result's own e2e: prompt, vision encoder,
  prefill, decode);
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
from edgelmm.export.onnx import export_onnx
from edgelmm.methods.quantization import AWQConfig, CalibrationConfig, quantize_checkpoint
from edgelmm.utils.io import atomic_write_text

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
REFERENCE = {"onnx int4": "torch w4a16"}  # engines compared with another than torch fp32


def engines(model: str, work: Path, threads: int, wanted: set[str] | None = None) -> dict[str, tuple[str, ModelSpec]]:
    """name -> (backend, spec), every export and the AWQ checkpoint made here first (only those
    of the `wanted` engines, where given)."""
    def want(name: str) -> bool:
        return wanted is None or name in wanted

    work.mkdir(parents=True, exist_ok=True)
    specs = {"torch fp32": ("torch", ModelSpec(path=model, device="cpu", dtype="float32"))}
    projectors: dict[str, str] = {}
    for outtype in TYPES:
        names = [f"llamacpp {outtype}"] + ([f"llamacpp {outtype} flash-attn"] if outtype == "f16" else [])
        if not any(want(n) for n in names):
            continue
        kind = "f32" if outtype == "f32" else "f16"
        if kind not in projectors:
            projectors[kind] = str(export_mmproj(model, work / f"{model}-mmproj-{kind}.gguf", kind, overwrite=True).path)
        lm = str(export_gguf(model, work / f"{model}-{outtype}.gguf", outtype, overwrite=True).path)
        options = {"mmproj": projectors[kind], "n_threads": threads}
        specs[names[0]] = ("llamacpp", ModelSpec(path=lm, options=options))
        if len(names) > 1:  # the language model with llama.cpp's fused attention (the backend's flash_attn option)
            specs[names[1]] = ("llamacpp", ModelSpec(path=lm, options={**options, "flash_attn": True}))
    onnx = {"threads": threads}
    if want("onnx fp32") or want("onnx fp32 profiles"):
        path = str(export_onnx(model, work / f"{model}.onnx", overwrite=True).path)
        specs["onnx fp32"] = ("onnx", ModelSpec(path=path, options=onnx))
        specs["onnx fp32 profiles"] = ("onnx", ModelSpec(path=path, options={**onnx, "prefill": "profiles"}))
    if want("torch w4a16") or want("onnx int4"):
        awq = AWQConfig(bits=4, group_size=128, calibration=CalibrationConfig(source="shapes"))
        quantized = quantize_checkpoint(model, work / f"{model}-awq", awq, awq.calibration, "cpu", "float32", True)["out"]
        specs["torch w4a16"] = ("torch", ModelSpec(path=str(quantized), device="cpu", dtype="float32"))
        specs["onnx int4"] = ("onnx", ModelSpec(path=str(export_onnx(str(quantized), work / f"{model}-int4.onnx",
                                                                     overwrite=True).path), options=onnx))
    references = {"torch fp32"} | {REFERENCE[w] for w in wanted or () if w in REFERENCE}
    return {name: spec for name, spec in specs.items() if want(name) or name in references}


def run_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    questions = shapes.generate(args.samples, 0, task="vqa")
    captions = shapes.generate(args.speed_samples + args.warmup, 1, task="caption")
    greedy = SamplingParams(max_new_tokens=24, logprobs=True)
    long = SamplingParams(max_new_tokens=64)
    answers: dict[str, list[str]] = {}
    results: dict[str, list[Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    wanted = set(args.engines.split(",")) if args.engines else None
    for name, (engine, spec) in engines(model, args.work, args.threads, wanted).items():
        backend = load(spec, backend=engine)
        with backend:
            answered = [backend.generate([Request.chat(q.question, [q.image])], greedy)[0] for q in questions]
            texts = [r.text.strip() for r in answered]
            results[name] = answered
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
    for name, texts in answers.items():
        against = REFERENCE.get(name, "torch fp32")
        reference = answers[against]
        rows[name]["reference"] = against
        rows[name]["identical_to_torch"] = sum(a == b for a, b in zip(texts, reference))
        rows[name]["identical_tokens"] = sum(a.token_ids == b.token_ids for a, b in zip(results[name], results[against]))
        gaps = [abs(x - y) for a, b in zip(results[name], results[against]) if a.token_ids == b.token_ids
                for x, y in zip(a.logprobs, b.logprobs)]
        rows[name]["max_logprob_gap"] = max(gaps, default=None)
        rows[name]["differing_examples"] = [
            {"question": q.question, "answer": q.answer, "reference": r, "this": t}
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
    parser.add_argument("--engines", default="", help="comma-separated engine names (default: every one); torch fp32 always runs")
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
    lines = [f"# Demo VLMs with images: torch vs llama.cpp vs ONNX Runtime ({record['machine']})", "", f"`{record['command']}`", "",
             f"shapes-vqa: {args.samples} questions, greedy; speed: {args.speed_samples} captions after {args.warmup} "
             "warm-up requests, TTFT includes the vision encoder. Reference: torch fp32, for onnx int4 torch W4A16 (the "
             "same AWQ checkpoint); logprob gap: the largest |difference| of the answer tokens' log-probabilities "
             "where the answers are token-identical.", "",
             "| model | engine | accuracy % | identical to reference | max logprob gap | question e2e p50 ms | "
             "caption TTFT p50 ms | TPOT p50 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, rows in record["models"].items():
        for name, row in rows.items():
            tpot = "-" if row["tpot_p50_ms"] is None else f"{row['tpot_p50_ms']:.2f}"
            gap = "-" if row["max_logprob_gap"] is None or row["reference"] == name else f"{row['max_logprob_gap']:.1e}"
            lines.append(f"| {model} | {name} | {100 * row['accuracy']:.1f} | {row['identical_tokens']}/{args.samples} | {gap} | "
                         f"{row['question_e2e_p50_ms']:.1f} | {row['ttft_p50_ms']:.1f} | {tpot} |")
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
