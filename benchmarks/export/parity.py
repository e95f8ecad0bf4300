"""ONNX export parity on tiny random-weight models of every exported family, CPU, fp32.

For each family (the real transformers classes, random weights from tests/tiny_models.py) the
checkpoint is exported with `export_onnx` and `--prompts` requests (chat turns; half with a random
image for the VLMs) go greedily through the torch backend and the onnx backend, once reading the
prompt whole and once in chunks of the export's prefill lengths (4, 16: rests padded). Recorded:
token-identical answers, and the largest |difference| between the two backends' log-probabilities
of the same answer tokens and of every prompt token (text prompts; top-5 at each position).

    PYTHONPATH=src:. python benchmarks/export/parity.py --out benchmarks/export/results/parity-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.export.onnx import export_onnx
from edgelmm.utils.io import atomic_write_text
from tests.tiny_models import make_image, save_tiny

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "llava", "qwen2_vl")
WORDS = "red green blue circle square triangle small big left right above below shapes".split()
QWEN_SIZE = (112, 84)


def requests(n: int, family: str, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 40))))
        images = [make_image(*QWEN_SIZE, seed=i) if family == "qwen2_vl" else make_image(seed=i)] \
            if family in ("llava", "qwen2_vl") and i % 2 == 0 else []
        out.append(Request.chat(text, images=images))
    return out


def gap(a: list[float] | None, b: list[float] | None) -> float:
    return max((abs(x - y) for x, y in zip(a or [], b or [])), default=0.0)


def run_family(family: str, n: int, work: Path) -> dict[str, Any]:
    path = save_tiny(family, work / family)
    export_onnx(str(path), work / f"{family}.onnx", prefill_lens=[4, 16], image_size=QWEN_SIZE if family == "qwen2_vl" else None)
    engines = {"torch": load(ModelSpec(path=str(path), device="cpu")),
               "onnx whole": load(str(work / f"{family}.onnx"), backend="onnx"),
               "onnx profiles": load(ModelSpec(path=str(work / f"{family}.onnx"), options={"prefill": "profiles"}), backend="onnx")}
    params = SamplingParams(max_new_tokens=16, temperature=0.0, logprobs=True)
    scored = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=5)
    asked = requests(n, family)
    texts = [Request(text=" ".join(WORDS[: 3 + i % 10])) for i in range(n)]
    answers = {name: e.generate(asked, params) for name, e in engines.items()}
    prompts = {name: e.generate(texts, scored) for name, e in engines.items()}
    row: dict[str, Any] = {"prompts": n, "with_images": sum(bool(r.all_images()) for r in asked)}
    for name in ("onnx whole", "onnx profiles"):
        pairs = list(zip(answers["torch"], answers[name]))
        row[name] = {
            "identical": sum(a.token_ids == b.token_ids for a, b in pairs),
            "answer_logprob_gap": max(gap(a.logprobs, b.logprobs) for a, b in pairs if a.token_ids == b.token_ids),
            "prompt_logprob_gap": max(gap([s.logprob for s in a.prompt_logprobs[1:]], [s.logprob for s in b.prompt_logprobs[1:]])
                                      for a, b in zip(prompts["torch"], prompts[name])),
            "generated_tokens": sum(len(b.token_ids) for _, b in pairs),
        }
    for engine in engines.values():
        engine.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        families = {f: run_family(f, args.prompts, Path(work)) for f in FAMILIES}
    record = {"command": f"python benchmarks/export/parity.py --out {args.out} --prompts {args.prompts}",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "families": families, "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(record, indent=2) + "\n")
    lines = [f"# ONNX export parity, tiny random models, fp32 ({record['machine']})", "", f"`{record['command']}`", "",
             "Greedy, 16 new tokens; gaps are the largest |torch - onnx| log-probability of the same token.", "",
             "| family | prompts (with images) | onnx whole: identical | answer gap | prompt gap | "
             "onnx profiles 4,16: identical | answer gap | prompt gap |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, row in families.items():
        w, p = row["onnx whole"], row["onnx profiles"]
        lines.append(f"| {family} | {row['prompts']} ({row['with_images']}) | {w['identical']}/{row['prompts']} | "
                     f"{w['answer_logprob_gap']:.1e} | {w['prompt_logprob_gap']:.1e} | {p['identical']}/{row['prompts']} | "
                     f"{p['answer_logprob_gap']:.1e} | {p['prompt_logprob_gap']:.1e} |")
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
