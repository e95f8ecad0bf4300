"""Draft-verify on the demo pair (shapes-vlm-xs drafting, shapes-vlm-l verifying), CPU, loopback.

    python benchmarks/collab/draft_verify.py --out benchmarks/collab/results/draft-verify-cpu.json
    python benchmarks/collab/draft_verify.py --sections rtt --out benchmarks/collab/results/draft-verify-rtt-cpu.json
    python benchmarks/collab/draft_verify.py --sections capacity --cloud-device cuda --out capacity-gpu.json  # a GPU cloud

1. Lossless, through the product path: the same captions and questions to `edgelmm serve CLOUD`
   (cloud-only greedy) and to `edgelmm collab serve --policy draft-verify` with the native and
   the generic protocol; token ids compared; each answer's draft statistics (its `edgelmm`
   field) summed: cloud forward passes per generated token, tokens the cloud read per round;
   the cloud's session hits and misses from its /metrics.
2. Latency over injected RTTs (0 / 20 / 80 ms): streamed answers, one request at a time,
   alternating, fresh captions, after a warm-up: the cloud alone (straight to `edgelmm serve`,
   the round trip injected by the client-side transport that `collab serve --rtt-ms` uses), and
   `collab serve --rtt-ms R` with draft-verify as it runs by default (adaptive draft length,
   streamed round by round; `draft_when: faster`, so an answer is streamed from the cloud alone
   while drafting measures slower), with `draft_when: always` (every answer drafted), and with
   the edge alone. Time to first token and to the last, as the client sees them.
3. Cloud capacity under 16 concurrent edge clients: each simulated client replays, against the
   cloud's verify route, the exact rounds a real drafter sent for a caption (recorded first, in
   this process, through NativeVerifier; greedy, so they are the rounds a live client sends; the
   clients' own drafting time is left out, as it is spent on other devices), against 16 clients
   asking the same cloud for the same captions by plain chat completions (batched by its
   engine). Output tokens per second served by the cloud, and latency per output token. Beside
   them, the same captions with max_tokens 1: the prompts' prefill alone, which every
   draft-verify answer pays in its opening round too, so `cloud-only / prefill-only` time bounds
   the ratio. The three take turns, three passes each (medians); the cloud runs --no-access-log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import CLOUD, EDGE, image_url, start, streamed  # noqa: E402

from edgelmm import ModelSpec, Request, SamplingParams  # noqa: E402
from edgelmm.backends.registry import load  # noqa: E402
from edgelmm.bench.metrics import percentile  # noqa: E402
from edgelmm.collab.client import CloudClient, CloudSettings, faulty_transport  # noqa: E402
from edgelmm.collab.speculative import Drafter, DraftLength, speculate  # noqa: E402
from edgelmm.collab.verify import NativeVerifier  # noqa: E402
from edgelmm.demo.shapes import generate  # noqa: E402
from edgelmm.serve.server import free_port  # noqa: E402

MAX_TOKENS = 64


def body(sample, model: str, stream: bool = False) -> dict:
    return {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, "return_token_ids": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(sample.image)}},
                                                      {"type": "text", "text": sample.question}]}]}


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def lossless(ports: dict[str, int], samples: dict[str, list]) -> dict:
    client = httpx.Client(timeout=120)
    out: dict = {}
    for task, items in samples.items():
        for protocol in ("native", "generic"):
            same, passes, tokens, rounds, processed, budget, per_round = 0, 0, 0, 0, 0, 0, []
            diffs = []
            for s in items:
                cloud = client.post(f"http://127.0.0.1:{ports['cloud']}/v1/chat/completions", json=body(s, CLOUD)).json()
                ours = client.post(f"http://127.0.0.1:{ports[protocol]}/v1/chat/completions", json=body(s, EDGE)).json()
                ref, got = cloud["choices"][0]["token_ids"], ours["choices"][0]["token_ids"]
                stats = ours["edgelmm"]["draft_verify"]
                same += ref == got
                if ref != got:
                    diffs.append({"question": s.question, "cloud": cloud["choices"][0]["message"]["content"],
                                  "draft_verify": ours["choices"][0]["message"]["content"]})
                passes += stats["cloud_forward_passes"]
                tokens += len(got)
                rounds += stats["rounds"]
                processed += stats["cloud_tokens_processed"]
                budget += sum(k + 1 for k in stats["draft_lengths"])
                per_round.append(stats["cloud_tokens_processed"] / stats["rounds"])
            out[f"{task}/{protocol}"] = {
                "prompts": len(items), "identical_to_cloud_greedy": same, "differences": diffs,
                "cloud_forward_passes_per_token": passes / tokens, "generated_tokens": tokens, "rounds": rounds,
                "cloud_tokens_read_per_round": processed / rounds, "draft_length_plus_one_per_round": budget / rounds,
                "max_request_tokens_read_per_round": max(per_round)}
    metrics = client.get(f"http://127.0.0.1:{ports['cloud']}/metrics").text
    hits, misses = metric(metrics, "edgelmm_verify_session_hits_total"), metric(metrics, "edgelmm_verify_session_misses_total")
    out["cloud_sessions"] = {"hits": hits, "misses": misses, "opened": metric(metrics, "edgelmm_verify_sessions_opened_total"),
                             "evicted": metric(metrics, "edgelmm_verify_sessions_evicted_total"),
                             "hit_rate": hits / (hits + misses) if hits + misses else None}
    return out


async def rtt_sweep(cloud_port: int, rtts: list[float], samples: list, warmup: list) -> dict:
    """Streamed answers, one at a time, alternating: the cloud alone (straight to the cloud, the
    round trip injected by the same client-side transport `collab serve --rtt-ms` uses), and
    `collab serve` with draft-verify (streamed round by round) and with the edge alone."""
    out: dict = {}
    cloud_url = f"http://127.0.0.1:{cloud_port}/v1"
    always = Path(tempfile.mkdtemp()) / "always.yaml"
    always.write_text("mode: draft_verify\ndraft_when: always\n")
    policies = {"draft-verify": "draft-verify", "draft-verify-always": str(always), "edge": "edge"}
    for rtt in rtts:
        servers = {}
        for name, policy in policies.items():
            port = free_port()
            servers[name] = (port, start(["collab", "serve", "--edge", EDGE, "--device", "cpu", "--cloud", cloud_url,
                                          "--policy", policy, "--rtt-ms", str(rtt)], port))
        wan = httpx.AsyncClient(timeout=120, transport=faulty_transport(CloudSettings(cloud_url, rtt_ms=rtt)))
        local = httpx.AsyncClient(timeout=120)
        targets = {"cloud": (wan, cloud_url + "/chat/completions", CLOUD),
                   **{p: (local, f"http://127.0.0.1:{port}/v1/chat/completions", EDGE) for p, (port, _) in servers.items()}}
        try:
            rows: dict[str, list[dict]] = {p: [] for p in targets}
            for phase, items in (("warmup", warmup), ("timed", samples)):
                for i, s in enumerate(items):
                    for name in (list(targets) if i % 2 == 0 else list(reversed(targets))):
                        client, url, model = targets[name]
                        row = await streamed(client, url, body(s, model))
                        if phase == "timed":
                            rows[name].append(row)
        finally:
            await wan.aclose()
            await local.aclose()
            for _, proc in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
        here = {p: {k: statistics.median(r[k] for r in rs) for k in ("ttft_ms", "total_ms", "ms_per_token")}
                for p, rs in rows.items()}
        for name in ("draft-verify", "draft-verify-always"):
            here[f"{name}_over_cloud_total"] = here[name]["total_ms"] / here["cloud"]["total_ms"]
            here[f"{name}_over_cloud_ttft"] = here[name]["ttft_ms"] / here["cloud"]["ttft_ms"]
        here["draft-verify_served_by"] = dict(collections.Counter(r["served_by"] for r in rows["draft-verify"]))
        out[f"{rtt:g}"] = here
        print(json.dumps({f"rtt {rtt:g}": here}), flush=True)
    return out


async def record_rounds(cloud_port: int, samples: list) -> list[dict]:
    """Each caption's verify rounds as a live drafter sends them (bodies and the answer's length)."""
    edge = load(ModelSpec(path=EDGE, device="cpu"))
    recorded = []
    async with CloudClient(CloudSettings(f"http://127.0.0.1:{cloud_port}/v1", timeout_s=60)) as cloud:
        for s in samples:
            bodies: list[dict] = []
            call = cloud.call

            async def recording(route, data, parse, headers=None, *, call=call, bodies=bodies):
                if route == "/edgelmm/verify" and not data.get("close"):
                    bodies.append(json.loads(json.dumps(data)))
                return await call(route, data, parse, headers)

            cloud.call = recording  # type: ignore[method-assign]
            request = Request.chat(s.question, images=[s.image])
            out = await speculate(request, SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0), Drafter(edge),
                                  NativeVerifier(cloud), DraftLength())
            cloud.call = call  # type: ignore[method-assign]
            recorded.append({"rounds": bodies, "tokens": len(out.result.token_ids)})
    edge.close()
    return recorded


async def capacity(cloud_port: int, samples: list, recorded: list[dict], clients: int, passes: int = 3) -> dict:
    url = f"http://127.0.0.1:{cloud_port}/v1"
    results: dict = {}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        before = await verify_counts(http, url)

        async def replay(job: dict) -> tuple[float, int]:
            session = f"cap-{uuid.uuid4().hex}"
            started = time.perf_counter()
            for round_ in job["rounds"]:
                answer = await http.post(url + "/edgelmm/verify", json={**round_, "session": session})
                answer.raise_for_status()
            await http.post(url + "/edgelmm/verify", json={"session": session, "close": True})
            return time.perf_counter() - started, job["tokens"]

        async def complete(sample, tokens: int = MAX_TOKENS) -> tuple[float, int]:
            started = time.perf_counter()
            answer = (await http.post(url + "/chat/completions", json={**body(sample, CLOUD), "max_tokens": tokens})).json()
            return time.perf_counter() - started, len(answer["choices"][0]["token_ids"])

        kinds = {"cloud_only": lambda: [complete(s) for s in samples],
                 "draft_verify": lambda: [replay(j) for j in recorded],
                 "prefill_only": lambda: [complete(s, 1) for s in samples]}
        for turn in range(passes):  # the kinds take turns, so that a slow spell of the machine hits each
            for kind, work in kinds.items():
                gate = asyncio.Semaphore(clients)

                async def gated(job, gate=gate):
                    async with gate:
                        return await job

                started, cpu = time.perf_counter(), time.process_time()
                done = await asyncio.gather(*(gated(j) for j in work()))
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                tokens = sum(t for _, t in done)
                row = {"requests": len(done), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                       "clients_cpu_s": cpu,  # the simulated clients' own CPU time, on the cloud's machine
                       "p50_ms_per_token": statistics.median(1000 * s / max(t, 1) for s, t in done),
                       "p90_ms_per_token": percentile([1000 * s / max(t, 1) for s, t in done], 90)}
                results.setdefault(kind, []).append(row)
                print(json.dumps({kind: row, "pass": turn}), flush=True)
        after = await verify_counts(http, url)  # over the draft-verify passes: how well the rounds were batched

    def median(kind: str, field: str) -> float:
        return statistics.median(row[field] for row in results[kind])

    results["throughput_ratio"] = median("draft_verify", "tokens_per_s") / median("cloud_only", "tokens_per_s")
    results["p50_ms_per_token"] = {kind: median(kind, "p50_ms_per_token") for kind in ("cloud_only", "draft_verify")}
    # what the cloud spends on the captions' prompts alone (one token each): the same prefill is
    # every draft-verify answer's opening round, so the ratio cannot pass this if rounds were free
    results["prefill_share_of_cloud_only"] = median("prefill_only", "wall_s") / median("cloud_only", "wall_s")
    results["throughput_ratio_ceiling"] = 1 / results["prefill_share_of_cloud_only"]
    results["passes"] = passes
    results["clients"] = clients
    results["verify_rounds_per_pass"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return results


async def verify_counts(http: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """The cloud's verify rounds on open sessions so far, and the forward passes that read them."""
    text = (await http.get(url.removesuffix("/v1") + "/metrics")).text
    return metric(text, "edgelmm_verify_session_hits_total"), metric(text, "edgelmm_verify_batches_total")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100, help="per task (captions and questions)")
    parser.add_argument("--rtt-samples", type=int, default=40)
    parser.add_argument("--capacity-samples", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rtts", default="0,20,80")
    parser.add_argument("--sections", default="lossless,rtt,capacity", help="which of the three to run")
    parser.add_argument("--cloud-device", default="cpu", help="where the cloud server runs its model (cuda: a GPU cloud)")
    parser.add_argument("--cloud-option", action="append", default=[], help="KEY=VALUE for the cloud's backend (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    ports = {"cloud": free_port(), "native": free_port(), "generic": free_port()}
    policies = Path(tempfile.mkdtemp())
    native, generic = policies / "native.yaml", policies / "generic.yaml"  # drafting every answer: what is measured
    native.write_text("mode: draft_verify\ndraft_when: always\n")
    generic.write_text("mode: draft_verify\ndraft_when: always\nprotocol: generic\n")
    options = [a for option in args.cloud_option for a in ("--option", option)]
    cloud = start(["serve", CLOUD, "--device", args.cloud_device, "--max-batch-size", str(args.clients), "--no-access-log",
                   *options], ports["cloud"])
    procs = [cloud]
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "edge": EDGE, "cloud": CLOUD, "max_tokens": MAX_TOKENS,
                    "cloud_device": args.cloud_device, "cloud_options": args.cloud_option}
    try:
        if "lossless" in sections:
            procs.append(start(["collab", "serve", "--edge", EDGE, "--device", "cpu", "--cloud",
                                f"http://127.0.0.1:{ports['cloud']}/v1", "--policy", str(native)], ports["native"]))
            procs.append(start(["collab", "serve", "--edge", EDGE, "--device", "cpu", "--cloud",
                                f"http://127.0.0.1:{ports['cloud']}/v1", "--policy", str(generic)], ports["generic"]))
            samples = {"captions": generate(args.prompts, seed=31, task="caption"), "vqa": generate(args.prompts, seed=32)}
            report["lossless"] = lossless(ports, samples)
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "differences"} if isinstance(v, dict) else v
                              for k, v in report["lossless"].items()}, indent=1), flush=True)
            for proc in procs[1:]:
                proc.terminate()
                proc.wait(timeout=30)
            procs = [cloud]
        if "rtt" in sections:
            report["rtt_sweep"] = asyncio.run(rtt_sweep(ports["cloud"], [float(r) for r in args.rtts.split(",")],
                                                        generate(args.rtt_samples, seed=33, task="caption"),
                                                        generate(8, seed=34, task="caption")))
        if "capacity" in sections:
            caps = generate(args.capacity_samples, seed=35, task="caption")
            recorded = asyncio.run(record_rounds(ports["cloud"], caps))
            report["capacity"] = asyncio.run(capacity(ports["cloud"], caps, recorded, args.clients))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if "capacity" in report:
        print(json.dumps({"capacity_ratio": report["capacity"]["throughput_ratio"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
