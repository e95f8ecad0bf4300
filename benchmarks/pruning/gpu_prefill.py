"""Prefill time and memory under visual-token pruning, Qwen2-VL-7B-shaped model on one CUDA GPU.

The model is the real Qwen2-VL-7B-Instruct config with random bf16 weights made on the GPU (speed
does not depend on the values), SDPA attention, fed one image of >= 1,500 visual tokens plus a
short prompt. For the unpruned model and every (method, kept share), one prefill (`model(...)`,
vision tower + language model, cache on, last logits only) is run `--warmup` times, then timed
`--repeats` times with CUDA events: the whole call, and the language model alone (events at its
entry and exit, so pruning's scoring and cutting count in it). Medians; the unpruned model is
measured first and last in the same process, and speed-ups are against the first. Peak memory is
the largest allocation above the weights during one prefill; the KV cache is measured after it.
Greedy decode of `--decode` tokens is timed for the unpruned model and the 25% cells.

    PYTHONPATH=src python benchmarks/pruning/gpu_prefill.py --out results/           # on the GPU
    PYTHONPATH=src python benchmarks/pruning/gpu_prefill.py --tiny --device cpu --out /tmp/pg  # script check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from flops import prefill_flops
from transformers import AutoConfig, AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

from edgelmm.methods.pruning import prune, pruning_of, unprune
from edgelmm.models.qwen2_vl import Qwen2VLAdapter
from edgelmm.registry import METHODS as METHOD_CLASSES

CONFIG = Path(__file__).resolve().parents[2] / "tests/fixtures/configs/Qwen2-VL-7B-Instruct"
METHODS = ("fastv", "random", "uniform", "visionzip")
TINY_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)  # head_dim 128 fits M-RoPE
TINY_VISION = dict(depth=2, embed_dim=64, num_heads=4, hidden_size=256)


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(CONFIG)
    if tiny:
        for key, value in TINY_TEXT.items():
            setattr(config.text_config, key, value)
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[: TINY_TEXT["num_hidden_layers"]]
        for key, value in TINY_VISION.items():
            setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_inputs(config: Any, width: int, height: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One image of (width/28)*(height/28) visual tokens between 24 and 40 prompt tokens."""
    vision = config.vision_config
    rows, cols = height // vision.patch_size, width // vision.patch_size
    n_visual = rows * cols // vision.spatial_merge_size**2
    text = torch.randint(1000, 20000, (64,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:24], torch.tensor([config.vision_start_token_id]), torch.full((n_visual,), config.image_token_id),
                     torch.tensor([config.vision_end_token_id]), text[24:]])[None]
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "mm_token_type_ids": (ids == config.image_token_id).int().to(device),
        "pixel_values": torch.randn(rows * cols, patch, generator=torch.Generator().manual_seed(1)).to(device, dtype),
        "image_grid_thw": torch.tensor([[1, rows, cols]], device=device),
    }


class Clock:
    """Start/end stamps of every call of a module: CUDA events on a GPU, wall time on a CPU."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        self.hooks = [module.register_forward_pre_hook(lambda *_: self._stamp(start=True)),
                      module.register_forward_hook(lambda *_: self._stamp(start=False))]

    def _stamp(self, start: bool) -> None:
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        if start:
            self.spans.append((mark, None))
        else:
            self.spans[-1] = (self.spans[-1][0], mark)

    def total_ms(self) -> float:
        """Summed time of the calls since the last reset (call after synchronising)."""
        return sum(a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in self.spans)

    def reset(self) -> None:
        self.spans.clear()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class StepClock(LogitsProcessor):
    """Wall time of every generated token, synchronised."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill(model: torch.nn.Module, inputs: dict[str, torch.Tensor], clocks: dict[str, Clock], device: torch.device,
            warmup: int, repeats: int) -> dict[str, Any]:
    """Medians over `repeats` timed prefills, after `warmup` untimed ones."""
    times: dict[str, list[float]] = {"total_ms": [], "lm_ms": [], "vision_ms": []}
    peak, kv = 0, 0
    for i in range(warmup + repeats):
        for clock in clocks.values():
            clock.reset()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        with torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        sync(device)
        cache = getattr(out, "cache", None) or out.past_key_values
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        del out, cache
        if i < warmup:
            continue
        times["total_ms"].append(clocks["model"].total_ms())
        times["lm_ms"].append(clocks["lm"].total_ms())
        times["vision_ms"].append(clocks["vision"].total_ms())
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return {**{key: statistics.median(values) for key, values in times.items()}, "peak_extra_bytes": peak, "kv_bytes": kv}


def decode_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], tokens: int, device: torch.device) -> float:
    """Median time per generated token after the first, greedy, exactly `tokens` tokens."""
    clock = StepClock(device)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    return statistics.median(b - a for a, b in zip(clock.stamps, clock.stamps[1:])) * 1e3


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables, one per image size."""
    meta = report["meta"]
    lines = [f"# Prefill under visual-token pruning: Qwen2-VL-7B shape, {meta['device']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}, {meta['attention']} attention, "
             f"batch 1, random weights. Medians of {meta['repeats']} timed prefills after {meta['warmup']} warm-ups; "
             "unpruned measured first and last in the same process, speed-ups against the first."]
    for size in dict.fromkeys(r["size"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["size"] == size]
        lines += ["", f"## {size} image: {rows[0]['visual_tokens']} visual tokens, {rows[0]['prompt_tokens']}-token prompt", "",
                  "| method | kept | LM tokens | LM prefill (ms) | LM speed-up | LM FLOPs saved | FLOPs speed-up "
                  "| vision (ms) | whole prefill (ms) | peak above weights (MiB) | KV cache (MiB) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['keep']:.1%} | {r['kept_tokens']} | {r['lm_ms']:.1f} | {r['lm_speedup']:.2f}× "
                f"| {r['flops_saved']:.1%} | {1 / (1 - r['flops_saved']):.2f}× | {r['vision_ms']:.1f} | {r['total_ms']:.1f} "
                f"| {r['peak_extra_bytes'] / 2**20:.0f} | {r['kv_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", type=Path, help="only write the Markdown tables of this results JSON into --out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="shrink the model: checks the script on a CPU")
    parser.add_argument("--sizes", nargs="+", default=["1120x1120", "1568x1568"], help="image WIDTHxHEIGHT in pixels")
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode", type=int, default=32, help="tokens for the decode timing (0: skip)")
    args = parser.parse_args()
    if args.render:
        (args.out / "gpu_prefill.md").write_text(markdown(json.loads(args.render.read_text())))
        return

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.time()
    model = build(args.tiny, device, dtype)
    adapter = Qwen2VLAdapter(model)
    text = model.config.text_config
    clocks = {"model": Clock(model, device), "lm": Clock(adapter.language_model(), device),
              "vision": Clock(adapter.vision_tower(), device)}
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    print(f"model ready in {time.time() - started:.1f}s, weights {weights / 2**30:.2f} GiB", flush=True)

    rows = []
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        inputs = make_inputs(model.config, width, height, device, dtype)
        n_tokens = inputs["input_ids"].shape[1]
        n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        cells = [("none", 1.0)] + [(m, keep) for m in args.methods for keep in args.keeps] + [("none (again)", 1.0)]
        for method, keep in cells:
            pruner = None
            if not method.startswith("none"):
                pruner = METHOD_CLASSES.get(method)(keep=keep, **({"k": 2} if method == "fastv" else {}))
                prune(model, adapter, pruner)
            row = prefill(model, inputs, clocks, device, args.warmup, args.repeats)
            kept = pruning_of(model).last.kept_tokens if pruner else n_tokens
            if args.decode and (pruner is None and method == "none" or keep == 0.25):
                row["decode_ms_per_token"] = decode_ms(model, inputs, args.decode, device)
            if pruner:
                unprune(model)
            flops = prefill_flops(text, n_tokens, kept, pruner.k if pruner else 0)
            row.update(size=size, method=str(pruner) if pruner else method, name=method, keep=keep,
                       prompt_tokens=n_tokens, visual_tokens=n_visual, kept_tokens=kept, lm_prefill_flops=flops)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        base = next(r for r in rows if r["size"] == size and r["name"] == "none")
        for row in rows:
            if row["size"] == size:
                row["lm_speedup"] = base["lm_ms"] / row["lm_ms"]
                row["total_speedup"] = base["total_ms"] / row["total_ms"]
                row["flops_saved"] = 1 - row["lm_prefill_flops"] / base["lm_prefill_flops"]

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(dtype), "attention": "sdpa", "tiny": args.tiny, "warmup": args.warmup, "repeats": args.repeats,
            "weights_bytes": weights, "seconds": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "gpu_prefill.md").write_text(markdown({"meta": meta, "rows": rows}))
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
