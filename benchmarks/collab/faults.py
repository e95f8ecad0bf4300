"""The edge keeps answering while the cloud is killed and restarted: 200 requests from 16
concurrent clients through `edgelmm collab serve`, with the cloud (`edgelmm serve`, a process of
its own) killed with SIGKILL and started again twice during the run.

    python benchmarks/collab/faults.py --out benchmarks/collab/results/faults-cpu.json

Every request is one fresh shapes question; the policy sends every answer to the cloud
(`--policy escalate`), so that each request depends on the cloud. Checked: every request gets a
200 with a complete answer (finish_reason stop), exactly one answer per request, `served_by` is
`cloud` or `edge_fallback` with a reason, fallbacks happen only while the cloud is down (or
until the breaker's next probe finds it back), and the latency's p99 against the cloud time-out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from edgelmm.bench.metrics import percentile
from edgelmm.demo.shapes import generate
from edgelmm.serve.server import free_port

EDGE, CLOUD = "shapes-vlm-xs", "shapes-vlm-l"


def start(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgelmm.cli", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"server on {port} did not start")


async def streamed(client: httpx.AsyncClient, url: str, data: dict) -> dict:
    """One streamed chat answer as the client sees it: time to the first content and to the
    end, its text, the usage the last chunk reports and, from `collab serve`, where it was served."""
    started, first, text, usage, served = time.perf_counter(), None, "", {}, None
    async with client.stream("POST", url, json={**data, "stream": True, "stream_options": {"include_usage": True}}) as answer:
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            served = (chunk.get("edgelmm") or {}).get("served_by", served)
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - started
                text += choice["delta"].get("content") or ""
    total = time.perf_counter() - started
    tokens = usage.get("completion_tokens", 0)
    return {"ttft_ms": 1000 * (first or total), "total_ms": 1000 * total, "tokens": tokens, "text": text,
            "prompt_tokens": usage.get("prompt_tokens", 0), "ms_per_token": 1000 * total / max(tokens, 1),
            "served_by": served}


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cloud-timeout-s", type=float, default=2.0)
    parser.add_argument("--pause-s", type=float, default=2.0, help="each client's pause between its requests")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cloud_port, edge_port = free_port(), free_port()
    cloud_args = ["serve", CLOUD, "--device", "cpu"]
    cloud = start(cloud_args, cloud_port)
    edge = start(["collab", "serve", "--edge", EDGE, "--device", "cpu", "--cloud", f"http://127.0.0.1:{cloud_port}/v1",
                  "--policy", "escalate", "--cloud-timeout-s", str(args.cloud_timeout_s), "--cloud-retries", "1",
                  "--max-connections", "256"], edge_port)
    samples = generate(args.requests, seed=11)
    events: list[tuple[float, str]] = []

    bodies = [json.dumps({"model": EDGE, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(s.image)}}, {"type": "text", "text": s.question}]}]})
        for s in samples]  # encoded before the clock starts: the clients only send
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.clients))

    def ask(i: int) -> dict:
        s = samples[i]
        started = time.perf_counter()
        try:
            r = http.post(f"http://127.0.0.1:{edge_port}/v1/chat/completions", content=bodies[i],
                          headers={"Content-Type": "application/json"})
            status, answer = r.status_code, r.json()
        except Exception as exc:  # noqa: BLE001  (a failure here is what the benchmark counts)
            status, answer = -1, {"error": repr(exc)}
        time.sleep(args.pause_s)  # a client's think time: the run spans both outages
        choice = (answer.get("choices") or [{}])[0]
        return {"i": i, "status": status, "start_s": started - t0, "latency_s": time.perf_counter() - started,
                "text": (choice.get("message") or {}).get("content"), "finish_reason": choice.get("finish_reason"),
                "correct": ((choice.get("message") or {}).get("content") or "").strip() == s.answer,
                "edgelmm": answer.get("edgelmm"), "error": answer.get("error")}

    def chaos() -> None:
        """Kill the cloud at 3 s and at 15 s of the run; restart it at once each time (it is back
        when its model has loaded)."""
        nonlocal cloud
        for kill_at in (3.0, 15.0):
            time.sleep(max(0.0, kill_at - (time.perf_counter() - t0)))
            cloud.send_signal(signal.SIGKILL)
            cloud.wait()
            events.append((time.perf_counter() - t0, "cloud killed"))
            cloud = start(cloud_args, cloud_port)
            events.append((time.perf_counter() - t0, "cloud back"))

    t0 = time.perf_counter()
    try:
        killer = threading.Thread(target=chaos)
        killer.start()
        with ThreadPoolExecutor(args.clients) as pool:
            rows = list(pool.map(ask, range(args.requests)))
        killer.join()
    finally:
        for proc in (edge, cloud):
            proc.terminate()
            proc.wait(timeout=30)
    served = [(r["edgelmm"] or {}).get("served_by") for r in rows]
    latencies = [r["latency_s"] for r in rows]
    # an outage lasts from the kill until the cloud is back and the breaker's next probe (2 s) finds it
    outages = [(events[i][0], events[i + 1][0] + 2.5) for i in range(0, len(events), 2)]

    def in_outage(r: dict) -> bool:
        return any(a <= r["start_s"] + r["latency_s"] and r["start_s"] <= b for a, b in outages)

    summary = {
        "requests": len(rows), "clients": args.clients, "cloud_timeout_s": args.cloud_timeout_s,
        "failed": sum(r["status"] != 200 for r in rows), "ids_answered_once": len({r["i"] for r in rows}) == len(rows),
        "complete": sum(r["status"] == 200 and r["finish_reason"] == "stop" and bool(r["text"]) for r in rows),
        "served_by": {k: served.count(k) for k in sorted(set(map(str, served)))},
        "fallbacks_with_reason": sum(s == "edge_fallback" and bool(r["edgelmm"]["reason"]) for s, r in zip(served, rows)),
        "fallbacks_outside_outages": sum(s == "edge_fallback" and not in_outage(r) for s, r in zip(served, rows)),
        "cloud_answers_after_each_outage": [sum(s == "cloud" and b < r["start_s"] < next_a
                                                for s, r in zip(served, rows))
                                            for (_, b), (next_a, _) in zip(outages, [*outages[1:], (1e9, 0)])],
        "server_total_ms_p99": percentile([r["edgelmm"]["total_ms"] for r in rows if r["edgelmm"]], 99),
        "server_total_ms_max": max(r["edgelmm"]["total_ms"] for r in rows if r["edgelmm"]),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies), "events": events,
        "machine": f"{os.cpu_count()} CPUs", "wall_s": time.perf_counter() - t0,
    }
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 and summary["complete"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
