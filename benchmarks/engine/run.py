"""The product's decode speed on one CUDA GPU: `edgelmm.load(path, device="cuda")` then `generate`,
batch 1, for real model shapes with random weights (speed does not depend on the values), every
variant in one process, against the roofline and the peer a user would pick instead.

Per case a checkpoint of the real config (random bf16 weights, the test suite's byte-level BPE
tokenizer with Qwen's special tokens; for the VLM, Qwen2-VL's own image processor at its default
pixel limits) is written to `--work` and loaded the way a user loads it. Variants of a case are
load options (`decode`, `sdpa_backends`) or methods (`rtn(bits=4, group_size=128)`,
`fastv(k=2, keep=0.25)`). For each variant:

* warm-up requests at prompt lengths that cover every cache bucket and prefill size the timed
  requests use (never the timed lengths themselves);
* decode: `--requests` requests of `--new-tokens` tokens, each at a prompt length not seen before
  in the process (what a server sees); tok/s = generated tokens after the first / their time,
  from the result's own timings; the median over requests is reported;
* TTFT: the result's time to first token (tokenization, vision encoder, prefill and the first
  sampling step: what a user waits for), at fresh prompt lengths near 160 and 3,000 tokens (text
  cases) or for the image request (the VLM case, with the vision tower's share measured by CUDA
  events at its entry and exit);
* the decode path each result reports, and for W4A16 the decode kernel chosen per layer shape.

Roofline: copy bandwidth measured in the same process (a 4 GiB device-to-device copy, bytes read
+ written over the time) divided by the model's resident weight bytes (`weight_bytes`).

    PYTHONPATH=src:. python benchmarks/engine/run.py --out benchmarks/engine/results/   # on the GPU
    PYTHONPATH=src:. python benchmarks/engine/run.py --tiny --device cpu --out /tmp/engine   # script check
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers

import edgelmm
from edgelmm import Request, SamplingParams
from edgelmm.methods.quantization import kernel_choices, weight_bytes
from edgelmm.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests/fixtures/configs"
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # Qwen2.5-1.5B-Instruct
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)  # head_dim 128 fits M-RoPE
TINY_VISION = dict(depth=2, embed_dim=64, num_heads=4, hidden_size=128)
IMAGE_SIDE = 1568  # 1568 / 14 = 112 patches a side, merged 2x2: 3,136 visual tokens


def case_list(tiny: bool) -> list[dict[str, Any]]:
    """Each case: a checkpoint and the variants measured on it (the first variant is the product default)."""
    engine: dict[str, Any] = {}
    generate = {"decode": "generate", "sdpa_backends": "default"}  # transformers' generate, PyTorch's own SDPA choice
    return [
        {"case": "qwen2.5-1.5b-bf16", "config": "Qwen2.5-7B-Instruct", "override": QWEN25_15B, "variants": [
            ("product", engine, []), ("transformers-generate", generate, [])]},
        {"case": "qwen2.5-7b-bf16", "config": "Qwen2.5-7B-Instruct", "override": {}, "ttft": True, "variants": [
            ("product", engine, []),
            ("product, cuDNN attention allowed", {"sdpa_backends": "default"}, []),
            ("product, no compile", {"compile": False}, []),
            ("transformers-generate", generate, []),
            ("transformers-generate, cuDNN attention off", {"decode": "generate"}, [])]},
        {"case": "qwen2.5-7b-w4a16", "config": "Qwen2.5-7B-Instruct", "override": {}, "ttft": True, "variants": [
            ("product", engine, ["rtn(bits=4, group_size=128)"]),
            ("transformers-generate", generate, ["rtn(bits=4, group_size=128)"])]},
        {"case": "qwen2-vl-7b-bf16", "config": "Qwen2-VL-7B-Instruct", "override": {}, "vision": True, "variants": [
            ("product", engine, []), ("product, fastv(k=2, keep=0.25)", engine, ["fastv(k=2, keep=0.25)"]),
            ("transformers-generate", generate, [])]},
    ]


# ---------------------------------------------------------------- checkpoints
def tokenizer_and_processor(vision: bool) -> tuple[Any, Any]:
    from tests.tiny_models import QWEN_IMAGE, _qwen_tokenizer, chatml

    tokenizer = _qwen_tokenizer()
    if not vision:
        tokenizer.chat_template = chatml()
        return tokenizer, tokenizer
    from edgelmm.models.processors import images_only

    image_processor = transformers.Qwen2VLImageProcessor()  # the model's defaults: 14-pixel patches, merged 2x2
    processor = images_only(transformers.Qwen2VLProcessor)(image_processor, tokenizer, chat_template=chatml(QWEN_IMAGE))
    return tokenizer, processor


def checkpoint_dir(case: dict[str, Any], work: Path) -> Path:
    return work / case["case"].replace("-w4a16", "-bf16")  # W4A16 is quantized at load from the bf16 checkpoint


def write_checkpoint(case: dict[str, Any], work: Path, tiny: bool, device: torch.device) -> Path:
    """The case's config with random bf16 weights, made on the device, saved as a Hugging Face directory."""
    from tests.tiny_models import _qwen_vision_ids

    path = checkpoint_dir(case, work)
    if (path / "config.json").is_file():
        return path
    vision = bool(case.get("vision"))
    tokenizer, processor = tokenizer_and_processor(vision)
    raw = json.loads((CONFIGS / case["config"] / "config.json").read_text())
    text = raw.setdefault("text_config", {}) if "text_config" in raw else raw
    text.update({**case["override"], **(TINY if tiny else {})})
    text.pop("layer_types", None)  # rebuilt for the layer count
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    raw.update(ids)
    text.update(ids)
    if vision:
        raw.update(_qwen_vision_ids(tokenizer))
        if tiny:
            raw["vision_config"].update(TINY_VISION)
        raw["vision_config"]["hidden_size"] = text.get("hidden_size", raw.get("hidden_size"))
    config = transformers.AutoConfig.for_model(**raw)
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    partial.rename(path)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return path


# ---------------------------------------------------------------- measuring
def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of a device-to-device copy (read + written), median of 10."""
    if device.type != "cuda":
        return None
    a = torch.empty(4 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * (4 << 30) / statistics.median(times[2:])


class VisionClock:
    """CUDA events at the vision tower's entry and exit (its share of TTFT)."""

    def __init__(self, tower: torch.nn.Module, device: torch.device):
        self.device, self.pairs = device, []
        self.hooks = [tower.register_forward_pre_hook(lambda *a: self._stamp(True)),
                      tower.register_forward_hook(lambda *a: self._stamp(False))]

    def _stamp(self, start: bool) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if start:
            self.pairs = []
        self.pairs.append(event)

    def last_ms(self) -> float | None:
        if len(self.pairs) < 2:
            return None
        start, end = self.pairs[-2], self.pairs[-1]
        if self.device.type == "cuda":
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class Lengths:
    """Prompt lengths never used before in this process."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def fresh(self, around: int, spread: int) -> int:
        for offset in range(0, 10 * spread + 1):
            for length in (around + offset, around - offset):
                if length > 8 and length not in self.used:
                    self.used.add(length)
                    return length
        raise RuntimeError("no fresh length left")


def text_request(length: int, vocab: int, seed: int) -> Request:
    ids = random.Random(seed).choices(range(3, vocab), k=length)
    return Request(token_ids=ids)


def image_request(words: int, tiny: bool) -> Request:
    from PIL import Image

    side = 112 if tiny else IMAGE_SIDE
    image = Image.new("RGB", (side, side), (200, 30, 30))
    return Request.chat(" ".join(["describe the red square"] * words), [image])


def timed(backend: Any, request: Request, new_tokens: int) -> dict[str, Any]:
    [result] = backend.generate([request], SamplingParams(max_new_tokens=new_tokens))
    t = result.timings
    decode = len(t.decode_s) / sum(t.decode_s) if t.decode_s else None
    return {"prompt_tokens": result.counts.prompt_tokens, "generated": len(result.token_ids),
            "ttft_ms": t.ttft_s * 1e3, "tok_s": decode, "e2e_s": t.e2e_s, "path": result.decode_path}


def measure_variant(case: dict[str, Any], name: str, options: dict[str, Any], methods: list[str], path: Path,
                    args: argparse.Namespace, lengths: Lengths, bandwidth: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    backend = edgelmm.load(str(path), device=args.device, options=options, methods=methods)
    load_s = time.perf_counter() - t0
    vocab = len(backend.adapter.tokenizer)
    weights = weight_bytes(backend.model)
    new = args.new_tokens
    vision = bool(case.get("vision"))
    clock = VisionClock(backend.adapter.vision_tower(), backend.device) if vision else None
    requests = args.requests if name.startswith("product") else max(2, args.requests // 2)
    record: dict[str, Any] = {"case": case["case"], "variant": name, "options": options, "methods": methods,
                              "path": "product" if name.startswith("product") else name.split(",")[0],
                              "weight_bytes": weights, "load_s": round(load_s, 1)}
    # warm-ups: the cache buckets (prompt + new tokens) and prefill sizes of every timed request
    t0 = time.perf_counter()
    if vision:
        for words in (1, 40):
            timed(backend, image_request(words, args.tiny), new)
    else:
        for around in (100, 250):
            timed(backend, text_request(lengths.fresh(around, 5), vocab, around), new)
        if case.get("ttft"):
            for around in (150, 3010):
                timed(backend, text_request(lengths.fresh(around, 5), vocab, around), 1)
    record["warmup_s"] = round(time.perf_counter() - t0, 1)
    runs = []
    for i in range(requests):
        if vision:
            request = image_request(2 + 3 * i, args.tiny)  # a new text length around the image each time
        else:
            request = text_request(lengths.fresh(110 + 140 * i // max(requests - 1, 1), 10), vocab, i)
        runs.append(timed(backend, request, new))
        if vision and clock is not None:
            runs[-1]["vision_ms"] = clock.last_ms()
    record["decode_runs"] = runs
    record["tok_s"] = statistics.median(r["tok_s"] for r in runs if r["tok_s"])
    record["ttft_ms"] = statistics.median(r["ttft_ms"] for r in runs)
    record["decode_path"] = sorted({r["path"] for r in runs if r["path"]})
    if vision:
        record["vision_ms"] = statistics.median(r["vision_ms"] for r in runs if r.get("vision_ms") is not None)
        record["visual_share"] = record["vision_ms"] / record["ttft_ms"]
    if case.get("ttft"):
        for around in (160, 3000):
            ttfts = [timed(backend, text_request(lengths.fresh(around, 10), vocab, around + j), 1)["ttft_ms"]
                     for j in range(args.ttft_requests)]
            record[f"ttft_ms_{around}"] = statistics.median(ttfts)
            record[f"ttft_runs_{around}"] = ttfts
    if bandwidth:
        record["roofline_tok_s"] = bandwidth / weights
        record["share_of_roofline"] = record["tok_s"] / record["roofline_tok_s"]
    decoder = getattr(backend, "decoder", None)
    record["compile_failure"] = getattr(decoder, "compile_failure", None)
    record["capture_failures"] = sorted({s.failure for s in (decoder.steps.values() if decoder else []) if s.failure})
    if methods and methods[0].startswith("rtn"):
        record["kernels"] = {"x".join(map(str, k[:2])) + " decode": v for k, v in kernel_choices().items()}
    if clock:
        clock.remove()
    backend.close()
    del backend
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return record


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Decode engine, {report['device']}", "", f"`{report['command']}`", "",
             f"copy bandwidth {report['copy_bandwidth_gb_s']} GB/s; batch 1, {report['new_tokens']} new tokens, "
             "fresh prompt length per request, medians", "",
             "| case | variant | path | tok/s | roofline tok/s | share | TTFT ms (decode prompts) | TTFT@160 | TTFT@3000 | vision ms |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def num(value: Any, fmt: str = ".1f") -> str:
        return "" if value is None else format(value, fmt)

    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['variant']} | {', '.join(r['decode_path'])} | {num(r['tok_s'])} | "
                     f"{num(r.get('roofline_tok_s'))} | {num(r.get('share_of_roofline'), '.0%')} | {num(r['ttft_ms'])} | "
                     f"{num(r.get('ttft_ms_160'))} | {num(r.get('ttft_ms_3000'))} | {num(r.get('vision_ms'))} |")
    return "\n".join(lines) + "\n"


def default_work() -> Path:
    """Memory-backed /dev/shm where it has room for a 7B checkpoint, else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40e9:
        return shm / "edgelmm-engine"
    return Path("/tmp/edgelmm-engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=default_work(), help="where the checkpoints are written")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script on a CPU)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--ttft-requests", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="the product's variants only")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [c for c in case_list(args.tiny) if not args.cases or c["case"] in args.cases.split(",")]
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report: dict[str, Any] = {
        "device": name, "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        "transformers": transformers.__version__, "copy_bandwidth_gb_s": round(bandwidth / 1e9) if bandwidth else None,
        "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d"), "cases": []}
    args.out.mkdir(parents=True, exist_ok=True)
    lengths = Lengths()
    for case in cases:
        try:
            path = write_checkpoint(case, args.work, args.tiny, device)
        except Exception as exc:  # record and go on: one case's failure must not lose the others
            message = " ".join(str(exc).split())[:300]
            report["cases"].append({"case": case["case"], "variant": "checkpoint", "error": f"{type(exc).__name__}: {message}"})
            traceback.print_exc()
            continue
        for variant, options, methods in case["variants"]:
            if args.no_peers and not variant.startswith("product"):
                continue
            t0 = time.perf_counter()
            try:
                record = measure_variant(case, variant, options, methods, path, args, lengths, bandwidth)
            except Exception as exc:
                traceback.print_exc()
                message = " ".join(str(exc).split())[:300]
                record = {"case": case["case"], "variant": variant, "error": f"{type(exc).__name__}: {message}"}
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
            record["device"], record["command"] = name, report["command"]
            record["wall_s"] = round(time.perf_counter() - t0, 1)
            report["cases"].append(record)
            print(json.dumps({k: v for k, v in record.items() if not k.endswith("runs") and k != "kernels"}), flush=True)
            atomic_write_text(args.out / "engine.json", json.dumps(report, indent=1, default=str))
            atomic_write_text(args.out / "engine.md", markdown(report))
        later = cases[cases.index(case) + 1:]
        if not any(checkpoint_dir(c, args.work) == path for c in later):
            shutil.rmtree(path, ignore_errors=True)
    print(markdown(report))


if __name__ == "__main__":
    main()
