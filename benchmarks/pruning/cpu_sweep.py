"""Every pruning method at 100 / 50 / 25 / 12.5 % kept visual tokens on the demo model, on a CPU:
accuracy, TTFT and KV-cache size, plus language-model prefill FLOPs from the model's shapes.

1. Accuracy: edgelmm's runner in eval mode over the matrix (model × methods × shapes-vqa,
   --samples samples, batches of 16: pruning keeps rows independent), exact match.
2. TTFT: the runner in bench mode, batch 1, 2 warm-ups, --ttft-samples samples, one token
   generated (the first token is all TTFT needs), median.
   The runner's own files (results.jsonl, report.md, per-sample outputs) go to --runs/accuracy
   and --runs/ttft; a rerun resumes there.
3. KV cache: measured on the model itself, bytes held by the cache after the prefill of the
   first --kv-samples samples, median.
4. Summary: --out/cpu_sweep.json, cpu_sweep.md and accuracy_vs_kept.png (one line per method).

    PYTHONPATH=src python benchmarks/pruning/cpu_sweep.py --out benchmarks/pruning/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
import transformers
from flops import prefill_flops
from transformers import AutoConfig

from edgelmm.bench import run_bench, run_eval
from edgelmm.config import BenchConfig, ModelSpec, SamplingParams, TaskSpec
from edgelmm.methods import apply, parse_method
from edgelmm.methods.pruning import pruning_of, unprune
from edgelmm.models.loader import load_model, resolve_model_path
from edgelmm.request import Request
from edgelmm.tasks import get_task

# label in the plot -> method spec; the papers' settings, then the proportional-attention variants
METHODS = {
    "fastv(k={k})": "fastv(k={k}, keep={keep})",
    "random": "random(keep={keep})",
    "uniform": "uniform(keep={keep})",
    "visionzip": "visionzip(keep={keep})",
    "visionzip(proportional=True)": "visionzip(keep={keep}, proportional=True)",
    "divprune": "divprune(keep={keep})",
    "divprune(k=1, merge=True)": "divprune(k=1, keep={keep}, merge=True)",
}
KEEPS = (1.0, 0.5, 0.25, 0.125)


def methods(fastv_k: int) -> dict[str, tuple[str, float]]:
    """Method spec -> (plot label, kept share), the unpruned model first."""
    cells = {"none": ("none", 1.0)}
    for label, spec in METHODS.items():
        for keep in KEEPS:
            cells[str(parse_method(spec.format(keep=keep, k=fastv_k)))] = (label.format(k=fastv_k), keep)
    return cells


def matrix(model: str, specs: list[str], samples: int, batch_size: int, new_tokens: int, name: str) -> BenchConfig:
    return BenchConfig(
        name=name, models=[ModelSpec(path=model)], methods=specs,
        tasks=[TaskSpec(name="shapes-vqa", samples=samples, seed=0)], device="cpu", dtype="float32",
        warmup=2, repeats=1, batch_size=batch_size, sampling=SamplingParams(max_new_tokens=new_tokens),
    )


def kv_bytes(model_path: str, methods: list[str], n: int) -> dict[str, dict[str, float]]:
    """Per method: median KV-cache bytes and kept tokens after the prefill of the first n samples."""
    model, _, adapter, _ = load_model(ModelSpec(path=model_path, device="cpu", dtype="float32"))
    samples = get_task(TaskSpec(name="shapes-vqa")).samples(n, seed=0)
    measured = {}
    for method in methods:
        apply(model, adapter, method)
        sizes, tokens = [], []
        for sample in samples:
            inputs = adapter.build_inputs(Request.chat(sample.prompt, sample.images))
            with torch.inference_mode():
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            sizes.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
            stats = pruning_of(model)
            tokens.append(stats.last.kept_tokens if stats and stats.last else inputs["input_ids"].shape[1])
        unprune(model)
        measured[method] = {"kv_bytes": statistics.median(sizes), "kept_tokens": statistics.median(tokens)}
    return measured


def summarize(cells: dict[str, tuple[str, float]], accuracy: list[dict[str, Any]], ttft: list[dict[str, Any]],
              kv: dict[str, dict[str, float]], text_config: Any) -> list[dict[str, Any]]:
    by_method = {r["method"]: r for r in accuracy}
    timed = {r["method"]: r for r in ttft}
    base, base_ttft = by_method["none"], timed["none"]["ttft_p50_s"]
    prompt = base["counts"]["prompt_tokens"]  # mean prompt length, for the FLOPs
    full = prefill_flops(text_config, round(prompt))
    rows = []
    for spec, (label, keep) in cells.items():
        record = by_method[spec]
        kept = kv[spec]["kept_tokens"] - kv["none"]["kept_tokens"] + prompt
        flops = prefill_flops(text_config, round(prompt), round(kept), getattr(parse_method(spec), "k", 0))
        rows.append({
            "method": spec, "name": label, "keep": keep,
            "accuracy": record["accuracy"],
            "relative_accuracy": record["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan"),
            "ttft_p50_ms": timed[spec]["ttft_p50_s"] * 1e3, "ttft_speedup": base_ttft / timed[spec]["ttft_p50_s"],
            "kv_bytes": kv[spec]["kv_bytes"], "kv_share": kv[spec]["kv_bytes"] / kv["none"]["kv_bytes"],
            "visual_tokens": record["counts"]["visual_tokens"], "prompt_tokens": prompt,
            "lm_prefill_flops": flops, "flops_saved": 1 - flops / full, "samples": record["samples"],
            "ttft_samples": timed[spec]["samples"],
        })
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Visual-token pruning on {meta['model']} (CPU)", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"float32. Task shapes-vqa (seed 0): accuracy by exact match over {meta['samples']} samples "
        f"(batches of 16); TTFT median over {meta['ttft_samples']} requests at batch 1 after 2 warm-ups; "
        "KV cache: median bytes after prefill; FLOPs: language-model prefill, from the model's shapes.", "",
        "| method | kept | accuracy | vs unpruned | TTFT p50 (ms) | TTFT speed-up | KV cache (KiB) | KV share | LM FLOPs saved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['keep']:.1%} | {r['accuracy']:.3f} | {r['relative_accuracy']:.1%} | {r['ttft_p50_ms']:.1f} "
            f"| {r['ttft_speedup']:.2f}× | {r['kv_bytes'] / 1024:.0f} | {r['kv_share']:.1%} | {r['flops_saved']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["name"] == "none")["accuracy"]
    figure, axes = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["name"] for r in rows if r["name"] != "none"):
        points = sorted((r["keep"], r["accuracy"]) for r in rows if r["name"] == name)
        axes.plot([100 * k for k, _ in points], [a for _, a in points], marker="o", label=name)
    axes.axhline(base, color="gray", linestyle="--", linewidth=1, label="unpruned")
    axes.axhline(0.95 * base, color="gray", linestyle=":", linewidth=1, label="95% of unpruned")
    axes.set_xscale("log", base=2)
    axes.set_xticks([12.5, 25, 50, 100], ["12.5", "25", "50", "100"])
    axes.set_xlabel("visual tokens kept (%)")
    axes.set_ylabel("accuracy (exact match)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-vlm-l")
    parser.add_argument("--samples", type=int, default=500, help="accuracy samples per cell")
    parser.add_argument("--ttft-samples", type=int, default=100, help="timed requests per cell")
    parser.add_argument("--kv-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1: toy-sized matmuls on a shared 2-core CPU run fastest on one")
    parser.add_argument("--fastv-k", type=int, default=2, help="FastV's layer (2, as in the paper)")
    parser.add_argument("--runs", type=Path, default=Path("runs/pruning_cpu"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cells = methods(args.fastv_k)
    specs = list(cells)
    accuracy = run_eval(matrix(args.model, specs, args.samples, 16, 16, "pruning_cpu_accuracy"), args.runs / "accuracy")
    ttft = run_bench(matrix(args.model, specs, args.ttft_samples, 1, 1, "pruning_cpu_ttft"), args.runs / "ttft")
    kv = kv_bytes(args.model, specs, args.kv_samples)
    text_config = AutoConfig.from_pretrained(resolve_model_path(args.model)).text_config
    rows = summarize(cells, accuracy, ttft, kv, text_config)
    meta = {"model": args.model, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads "
            f"({platform.processor() or 'unknown processor'})", "threads": args.threads, "samples": args.samples,
            "ttft_samples": args.ttft_samples, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": ttft[0]["device"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "cpu_sweep.md").write_text(markdown(rows, meta))
    plot(rows, args.out / "accuracy_vs_kept.png", f"{args.model}, shapes-vqa ({args.samples} samples)")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
