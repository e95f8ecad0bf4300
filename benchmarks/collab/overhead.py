"""What routing costs a request that stays on the edge: `edgelmm serve EDGE` (the edge alone)
against `edgelmm collab serve --edge EDGE --cloud ... --policy POLICY`, same questions, one at a
time, alternating between the two servers, measured by the client (whole request over HTTP).

    python benchmarks/collab/overhead.py --policy benchmarks/collab/results/ablate-cpu/policies/shapes-vqa-baseline.yaml \
        --edge shapes-vlm-thumb --out benchmarks/collab/results/overhead-cpu.json

Only the requests the policy keeps on the edge are compared (the others wait for the cloud by
design); the figure is the median of the paired differences, after a warm-up of both servers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import CLOUD, EDGE, image_url, start  # noqa: E402

from edgelmm.bench.metrics import percentile  # noqa: E402
from edgelmm.demo.shapes import generate  # noqa: E402
from edgelmm.serve.server import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--edge", default=EDGE, help=f"the edge model (default {EDGE})")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ports = {"cloud": free_port(), "edge": free_port(), "collab": free_port()}
    procs = [start(["serve", CLOUD, "--device", "cpu"], ports["cloud"]),
             start(["serve", args.edge, "--device", "cpu"], ports["edge"]),
             start(["collab", "serve", "--edge", args.edge, "--device", "cpu", "--cloud", f"http://127.0.0.1:{ports['cloud']}/v1",
                    "--policy", args.policy], ports["collab"])]
    client = httpx.Client(timeout=60)

    def ask(server: str, sample) -> tuple[float, dict]:
        body = {"model": args.edge, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(sample.image)}}, {"type": "text", "text": sample.question}]}]}
        started = time.perf_counter()
        answer = client.post(f"http://127.0.0.1:{ports[server]}/v1/chat/completions", json=body).json()
        return time.perf_counter() - started, answer

    try:
        for s in generate(args.warmup, seed=21):
            ask("edge", s), ask("collab", s)
        rows = []
        for i, s in enumerate(generate(args.requests, seed=22)):
            order = ("edge", "collab") if i % 2 == 0 else ("collab", "edge")
            got = {name: ask(name, s) for name in order}
            rows.append({"i": i, "edge_s": got["edge"][0], "collab_s": got["collab"][0],
                         "served_by": got["collab"][1]["edgelmm"]["served_by"],
                         "same_answer": got["edge"][1]["choices"][0]["message"]["content"]
                         == got["collab"][1]["choices"][0]["message"]["content"]})
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    kept = [r for r in rows if r["served_by"] == "edge"]
    diffs = [1000 * (r["collab_s"] - r["edge_s"]) for r in kept]
    summary = {"requests": len(rows), "kept_on_edge": len(kept), "same_answer_when_kept": all(r["same_answer"] for r in kept),
               "edge_alone_p50_ms": 1000 * statistics.median(r["edge_s"] for r in kept),
               "collab_kept_p50_ms": 1000 * statistics.median(r["collab_s"] for r in kept),
               "paired_overhead_p50_ms": statistics.median(diffs), "paired_overhead_p90_ms": percentile(diffs, 90),
               "policy": args.policy, "machine": f"{os.cpu_count()} CPUs"}
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
