"""The second turn of a multi-turn chat with and without the KV caches, CPU, the demo models.

    python benchmarks/collab/caches.py --out benchmarks/collab/results/caches-cpu.json

- Edge, in process (`edgelmm.load`, what `collab serve` and `chat` run): shapes-vlm-xs on the
  torch backend with `options: {prefix_cache_mb: 64}` against the same model without, and the
  same model exported to GGUF (f32, with its mmproj) on the llamacpp backend with
  `options: {prompt_cache_mb: 64}` against it without. TTFT as the backend reports it (the
  whole prompt: vision encoder included).
- The same for shapes-vlm-l in process (a bigger model, whose prefill is more of its TTFT).
- Cloud, over HTTP: `edgelmm serve shapes-vlm-l --option prefix_cache_mb=256` against the same
  server without, streamed; TTFT measured by the client (request sent to first content).

Each conversation is fresh (a new picture, a first question, the model's answer, a second
question); the cached and the uncached side run the same turns, alternating which goes first,
after warm-up conversations. The figure is the median of turn-2 TTFT (cached / uncached) with the
turn-1 TTFT beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import CLOUD, EDGE, image_url, start, streamed  # noqa: E402

from edgelmm import ModelSpec, Request, SamplingParams  # noqa: E402
from edgelmm.backends.registry import load  # noqa: E402
from edgelmm.demo.shapes import generate  # noqa: E402
from edgelmm.export.gguf import export_gguf  # noqa: E402
from edgelmm.export.mmproj import export_mmproj  # noqa: E402
from edgelmm.serve.server import free_port  # noqa: E402

FOLLOW_UPS = ["How many shapes are there?", "Is there a red shape?", "What shape is at the top left?"]
PARAMS = SamplingParams(max_new_tokens=16, temperature=0)


def turns(sample, answer: str | None, follow: str) -> list[dict]:
    first = [{"role": "user", "content": [{"type": "image", "image": sample.image}, {"type": "text", "text": sample.question}]}]
    return first if answer is None else first + [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]


def in_process(name: str, cached, plain, samples, warmup) -> dict:
    rows = []
    for phase, items in (("warmup", warmup), ("timed", samples)):
        for i, s in enumerate(items):
            follow = FOLLOW_UPS[i % len(FOLLOW_UPS)]
            got = {}
            for label, backend in ((("cached", cached), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("cached", cached))):
                one = backend.generate([Request(messages=turns(s, None, follow))], PARAMS)[0]
                two = backend.generate([Request(messages=turns(s, one.text, follow))], PARAMS)[0]
                got[label] = (one, two)
            if phase == "timed":
                rows.append({"turn1_cached_ms": 1000 * got["cached"][0].timings.ttft_s,
                             "turn1_plain_ms": 1000 * got["plain"][0].timings.ttft_s,
                             "turn2_cached_ms": 1000 * got["cached"][1].timings.ttft_s,
                             "turn2_plain_ms": 1000 * got["plain"][1].timings.ttft_s,
                             "turn2_prompt_tokens": got["plain"][1].counts.prompt_tokens,
                             "same_answers": [r.token_ids for r in got["cached"]] == [r.token_ids for r in got["plain"]]})
    return summarize(name, rows)


def summarize(name: str, rows: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_ms")}
    ratios = [r["turn2_cached_ms"] / r["turn2_plain_ms"] for r in rows]
    out = {**{f"{k}_p50": round(v, 3) for k, v in med.items()}, "turn2_ratio_p50": statistics.median(ratios),
           "conversations": len(rows), "same_answers": sum(r["same_answers"] for r in rows),
           "turn2_prompt_tokens_p50": statistics.median(r["turn2_prompt_tokens"] for r in rows)}
    print(json.dumps({name: out}), flush=True)
    return out


def cloud(samples, warmup) -> dict:
    ports = {"cached": free_port(), "plain": free_port()}
    procs = [start(["serve", CLOUD, "--device", "cpu", "--option", "prefix_cache_mb=256"], ports["cached"]),
             start(["serve", CLOUD, "--device", "cpu"], ports["plain"])]
    client = httpx.AsyncClient(timeout=120)

    def ask(port: int, messages: list[dict]) -> tuple[float, str, int]:
        wire = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {"url": image_url(p["image"])}} if p["type"] == "image" else p
                           for p in content]
            wire.append({"role": m["role"], "content": content})
        body = {"model": CLOUD, "messages": wire, "max_tokens": 16, "temperature": 0}
        got = loop.run_until_complete(streamed(client, f"http://127.0.0.1:{port}/v1/chat/completions", body))
        return got["ttft_ms"], got["text"], got["prompt_tokens"]

    loop = asyncio.new_event_loop()
    rows = []
    try:
        for phase, items in (("warmup", warmup), ("timed", samples)):
            for i, s in enumerate(items):
                follow = FOLLOW_UPS[i % len(FOLLOW_UPS)]
                got = {}
                for label in (("cached", "plain") if i % 2 == 0 else ("plain", "cached")):
                    t1, answer, _ = ask(ports[label], turns(s, None, follow))
                    t2, second, prompt = ask(ports[label], turns(s, answer, follow))
                    got[label] = (t1, t2, answer, second, prompt)
                if phase == "timed":
                    rows.append({"turn1_cached_ms": got["cached"][0], "turn1_plain_ms": got["plain"][0],
                                 "turn2_cached_ms": got["cached"][1], "turn2_plain_ms": got["plain"][1],
                                 "turn2_prompt_tokens": got["plain"][4],
                                 "same_answers": got["cached"][2:4] == got["plain"][2:4]})
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    return summarize("cloud (edgelmm serve)", rows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    samples, warmup = generate(args.conversations, seed=41), generate(4, seed=42)
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "edge": EDGE, "cloud": CLOUD, "max_new_tokens": 16}
    report["edge_torch"] = in_process("edge torch", load(ModelSpec(path=EDGE, device="cpu", options={"prefix_cache_mb": 64})),
                                      load(ModelSpec(path=EDGE, device="cpu")), samples, warmup)
    # the same on the bigger demo model, in process: where prefill is more of the first token's time
    report["torch_l_in_process"] = in_process(
        "torch shapes-vlm-l", load(ModelSpec(path=CLOUD, device="cpu", options={"prefix_cache_mb": 64})),
        load(ModelSpec(path=CLOUD, device="cpu")), samples, warmup)
    folder = Path(tempfile.mkdtemp())
    gguf, mmproj = export_gguf(EDGE, folder / "xs.gguf").path, export_mmproj(EDGE, folder / "xs-mmproj.gguf").path
    base = {"mmproj": str(mmproj)}
    report["edge_llamacpp"] = in_process(
        "edge llamacpp", load(ModelSpec(path=str(gguf), options={**base, "prompt_cache_mb": 64}), "llamacpp"),
        load(ModelSpec(path=str(gguf), options=base), "llamacpp"), samples, warmup)
    report["cloud"] = cloud(samples, warmup)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
