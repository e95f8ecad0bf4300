"""Where a decode step's time goes: the product's step for one loaded model, on CUDA.

Loads a checkpoint written by `run.py` (`--work`) through `edgelmm.load`, runs one request so the
step is compiled and captured, then reports, for the step at that request's cache length:

* the step's time as CUDA-graph replays back to back (events; no host in the loop), beside the
  per-token time the request itself saw (host loop included);
* the kernels of one step run eagerly (compiled, not captured) under torch.profiler, grouped by
  name, with their GPU time: what the graph replays.

    PYTHONPATH=src:. python benchmarks/engine/profile_step.py --case qwen2.5-7b-bf16 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the benchmark's checkpoints and requests)

import edgelmm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="qwen2.5-7b-bf16")
    parser.add_argument("--methods", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=run.default_work())
    parser.add_argument("--prompt", type=int, default=200)
    args = parser.parse_args()
    case = next(c for c in run.case_list(False) if c["case"] == args.case)
    path = run.write_checkpoint(case, args.work, False, torch.device("cuda"))
    methods = [m for m in args.methods.split(";") if m]
    backend = edgelmm.load(str(path), device="cuda", methods=methods)
    vocab = len(backend.adapter.tokenizer)
    seen = run.timed(backend, run.text_request(args.prompt, vocab, 0), 256)
    decoder = backend.decoder
    [step] = [s for s in decoder.steps.values() if s.graph is not None][-1:]
    report = {"case": args.case, "methods": methods, "cache_length": step.length, "request": seen}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):  # 50 replays from the prompt's end each (the cache has room for 256)
        with torch.inference_mode():  # the step's buffers are inference tensors
            step.slot.fill_(args.prompt)
        start.record()
        for _ in range(50):
            step.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 50)
    report["graph_replay_ms"] = sorted(times)[2]
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), backend._attention():
        step.slot.fill_(args.prompt)
        for _ in range(3):
            step.run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step.run()
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_time_total > 0:
            rows.append({"kernel": event.key[:120], "calls_per_step": event.count / 5,
                         "us_per_step": event.device_time_total / 5})
    rows.sort(key=lambda r: -r["us_per_step"])
    report["kernels"] = rows[:40]
    report["kernel_us_per_step"] = sum(r["us_per_step"] for r in rows)
    report["kernel_launches_per_step"] = sum(r["calls_per_step"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile-{args.case}{'-' + methods[0].split('(')[0] if methods else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "kernels"}))
    for r in rows[:25]:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel']}")


if __name__ == "__main__":
    main()
