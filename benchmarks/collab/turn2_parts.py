"""Where a cached second turn's TTFT goes on the torch edge (shapes-vlm-xs, CPU).

    python benchmarks/collab/turn2_parts.py --out benchmarks/collab/results/turn2-parts-cpu.json

The conversations and sides of `caches.py` (fresh pictures, seed 41; `prefix_cache_mb: 64`
against the same model without), with timers wrapped around the steps of the cached side's
second turn: the prompt's inputs (chat template, processor with its tokenizer), the prefix
cache's lookup, the forward over the rest of the prompt, the insert, and the decode engine's
whole prefill. A diagnostic: the wrappers add a few microseconds per step, so its TTFTs are
quoted beside `caches.py`'s, never in their place.

Then the forward over the rest of the last conversation's second turn alone, on top of its cached
head, run again and again: back to back, and each after the process has slept 1, 5, 20 and 200 ms
(a chat's turns come seconds apart); medians.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caches import FOLLOW_UPS, PARAMS, turns  # noqa: E402
from faults import EDGE  # noqa: E402

from edgelmm import ModelSpec, Request  # noqa: E402
from edgelmm.backends import decode, prefix_cache, torch_backend  # noqa: E402
from edgelmm.backends.registry import load  # noqa: E402
from edgelmm.demo.shapes import generate  # noqa: E402
from edgelmm.models import base  # noqa: E402

STEPS = [(torch_backend.TorchBackend, "prepare_inputs", "inputs (template + processor)"),
         (base.ModelAdapter, "chat_text", "chat template"), (base.ModelAdapter, "_process", "processor"),
         (decode.StaticDecoder, "prefill", "prefill (lookup + forward + insert)"),
         (prefix_cache, "lookup", "prefix lookup"), (prefix_cache, "forward_from", "forward over the rest"),
         (prefix_cache, "insert", "prefix insert")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    times: dict[str, list[float]] = collections.defaultdict(list)
    timing = [False]

    def wrap(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if timing[0]:
                    times[label].append(1000 * (time.perf_counter() - start))
        setattr(owner, name, timed)

    for step in STEPS:
        wrap(*step)
    cached = load(ModelSpec(path=EDGE, options={"prefix_cache_mb": 64}))
    plain = load(ModelSpec(path=EDGE))
    samples, warmup = generate(args.conversations, seed=41), generate(4, seed=42)
    rows = []
    for phase, items in (("warmup", warmup), ("timed", samples)):
        for i, sample in enumerate(items):
            follow = FOLLOW_UPS[i % len(FOLLOW_UPS)]
            got = {}
            sides = (("plain", plain), ("cached", cached))
            for label, backend in sides if i % 2 == 0 else sides[::-1]:  # alternating which goes first
                one = backend.generate([Request(messages=turns(sample, None, follow))], PARAMS)[0]
                second = Request(messages=turns(sample, one.text, follow))
                if backend is cached:  # its rest and cached head as this turn meets them, for the idle runs below
                    inputs = cached.prepare_inputs([second], PARAMS)
                    _, hit = prefix_cache.lookup(cached.adapter, inputs, cached.prefix_cache, second.all_images())
                timing[0] = phase == "timed" and label == "cached"
                two = backend.generate([second], PARAMS)[0]
                timing[0] = False
                got[label] = 1000 * two.timings.ttft_s
            if phase == "timed":
                rows.append(got)
    with torch.inference_mode():  # the last second turn's rest, on top of the head it found cached
        idle = {}
        for pause_ms in (0, 1, 5, 20, 200):
            runs = []
            for _ in range(200 if pause_ms < 200 else 30):
                time.sleep(pause_ms / 1000)
                start = time.perf_counter()
                prefix_cache.forward_from(cached.model, cached.adapter, inputs, hit, logits_to_keep=1)
                runs.append(1000 * (time.perf_counter() - start))
            idle[f"after {pause_ms} ms idle"] = round(statistics.median(runs), 3)
    report = {
        "model": EDGE, "conversations": len(rows),
        "turn2_ttft_ms_p50": {k: statistics.median(r[k] for r in rows) for k in ("cached", "plain")},
        "turn2_ratio_p50": statistics.median(r["cached"] / r["plain"] for r in rows),
        "cached_turn2_steps_ms_p50": {label: round(statistics.median(times[label]), 3) for _, _, label in STEPS},
        "rest_forward_ms_p50": {"prompt_tokens": inputs["input_ids"].shape[1], "cached_tokens": hit.tokens, **idle},
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
