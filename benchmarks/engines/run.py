"""One model, the same requests, four ways: torch in process (its decode engine, and transformers'
`generate` for comparison), our OpenAI server through the openai backend, and llama.cpp on the
model's GGUF. TTFT, TPOT, decode tokens/s and peak memory
side by side (see README.md here for the command and the recorded results).

Each engine runs in a process of its own so that its peak memory is its own: the resident set of
the torch and llama.cpp worker processes, and of the `edgelmm serve` process for the server (the
client's memory is not the model's). Requests run one at a time (batch 1), after warm-up.

Workloads: "text" (a caption request without the image: the only one llama.cpp can run, since the
GGUF holds the language model only) for all three; "image" (the same request with its picture,
145 more prompt tokens) for torch and the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ENGINES = ("torch", "torch-generate", "openai", "llamacpp")  # torch-generate: options {decode: generate}


def workload(kind: str, samples: int, seed: int) -> list[Any]:
    from edgelmm import Request
    from edgelmm.demo.shapes import generate

    return [Request.chat(s.question, [s.image] if kind == "image" else []) for s in generate(samples, seed, task="caption")]


def measure(backend: Any, kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgelmm import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for request in workload(kind, args.warmup, seed=99):
        backend.generate([request], params)
    rows = []
    for request in workload(kind, args.samples, seed=args.seed):
        [result] = backend.generate([request], params)
        rows.append({"text": result.text, "ttft_s": result.timings.ttft_s, "decode_s": result.timings.decode_s,
                     "e2e_s": result.timings.e2e_s, "prompt_tokens": result.counts.prompt_tokens,
                     "generated_tokens": result.counts.generated_tokens, "peak_memory_bytes": result.peak_memory_bytes})
    return rows


class RssSampler:
    """Largest resident set of another process (the server), sampled every 5 ms."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one engine on the workloads it supports; returns {workload: rows} plus engine facts."""
    from edgelmm import ModelSpec, load

    kinds = ["text"] if args.engine == "llamacpp" else ["text", "image"]
    if args.engine in ("torch", "torch-generate"):
        options = {"decode": "generate"} if args.engine == "torch-generate" else {}
        with load(ModelSpec(path=args.model, device="cpu", options=options)) as backend:
            return {"device": backend.device_name(), "runs": {k: measure(backend, k, args) for k in kinds}}
    if args.engine == "llamacpp":
        with load(ModelSpec(path=args.gguf, options={"n_threads": os.cpu_count()}), backend="llamacpp") as backend:
            return {"device": backend.device_name(), "runs": {k: measure(backend, k, args) for k in kinds}}
    from edgelmm.serve.server import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgelmm.cli", "serve", args.model, "--port", str(port),
                               "--served-model-name", "bench", "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spec = ModelSpec(path="bench", options={"base_url": f"http://127.0.0.1:{port}/v1", "return_token_ids": True,
                                                "retries": 60, "backoff_s": 0.25})
        with load(spec, backend="openai") as backend, RssSampler(server.pid) as rss:
            runs = {k: measure(backend, k, args) for k in kinds}
        return {"device": "edgelmm serve on 127.0.0.1 (torch, cpu) via the openai backend", "runs": runs,
                "server_peak_memory_bytes": rss.peak}
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------- summary and report


def summarize(rows: list[dict[str, Any]], reference: list[dict[str, Any]] | None) -> dict[str, Any]:
    from edgelmm.bench.metrics import percentile

    decode = [d for r in rows for d in r["decode_s"]]
    return {
        "requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
        "generated_tokens": sum(r["generated_tokens"] for r in rows) / len(rows),
        "ttft_p50_ms": 1000 * percentile([r["ttft_s"] for r in rows], 50),
        "ttft_p90_ms": 1000 * percentile([r["ttft_s"] for r in rows], 90),
        "tpot_p50_ms": 1000 * percentile(decode, 50) if decode else None,
        "decode_tok_s": len(decode) / sum(decode) if decode else None,
        "e2e_tok_s": sum(r["generated_tokens"] for r in rows) / sum(r["e2e_s"] for r in rows),
        "e2e_p50_ms": 1000 * percentile([r["e2e_s"] for r in rows], 50),
        "same_text_as_torch": None if reference is None else
        sum(a["text"] == b["text"] for a, b in zip(rows, reference)) / len(rows),
    }


def report(record: dict[str, Any]) -> str:
    lines = [
        f"# Engines side by side: {record['model']}", "",
        f"Machine: {record['machine']}. Batch 1, greedy, at most {record['max_new_tokens']} new tokens, "
        f"{record['samples']} requests per cell after {record['warmup']} warm-up; each engine ran "
        f"{record['rounds']} rounds, interleaved, and the table shows its round with the lowest median end-to-end "
        f"time (all rounds are in results.json). Versions: {record['versions']}.", "",
        "| workload | engine | prompt tok | gen tok | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | decode tok/s | e2e tok/s | "
        "peak RSS MB | same text as torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for kind in ("text", "image"):
        for engine in ENGINES:
            cell = record["engines"][engine]["summary"].get(kind)
            if cell is None:
                lines.append(f"| {kind} | {engine} | | | | | | | | | not run: the GGUF holds the language model only |")
                continue
            lines.append(
                f"| {kind} | {engine} | {cell['prompt_tokens']:.0f} | {cell['generated_tokens']:.1f} | "
                f"{fmt(cell['ttft_p50_ms'], '.1f')} | {fmt(cell['ttft_p90_ms'], '.1f')} | {fmt(cell['tpot_p50_ms'], '.2f')} | "
                f"{fmt(cell['decode_tok_s'], '.0f')} | {fmt(cell['e2e_tok_s'], '.0f')} | "
                f"{record['engines'][engine]['peak_memory_mb']:.0f} | {fmt(cell['same_text_as_torch'], '.0%')} |"
            )
    lines += ["", "Engines (1-minute load average when the reported round started):"]
    lines += [f"- {e}: {record['engines'][e]['device']} (load {record['engines'][e]['load_at_start']})" for e in ENGINES]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import psutil

    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()} {platform.machine()}"


def wait_for_quiet(threshold: float, patience_s: float = 300) -> float:
    """Wait (up to `patience_s`) until the 1-minute load average is below `threshold`: on a 2-core
    machine any other busy process shows up in every number. Returns the load when starting."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-vlm-s")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet-load", type=float, default=0.5, help="start each engine below this 1-min load average")
    parser.add_argument("--rounds", type=int, default=3, help="runs per engine; the report shows the least disturbed")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(worker(args)))
        return

    from importlib.metadata import version

    from edgelmm.export.gguf import export_gguf
    from edgelmm.utils.io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = export_gguf(args.model, out / "model.gguf", overwrite=True).path
    record: dict[str, Any] = {
        "model": args.model, "samples": args.samples, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "machine": machine(),
        "versions": {p: version(p) for p in ("torch", "transformers", "llama_cpp_python", "fastapi", "uvicorn")},
        "command": " ".join(["python", "benchmarks/engines/run.py", *sys.argv[1:]]), "engines": {},
    }
    rounds: dict[str, list[dict[str, Any]]] = {engine: [] for engine in ENGINES}
    for round_ in range(args.rounds):  # engines interleaved, so that a busy spell does not hit one engine only
        for engine in ENGINES:
            load = wait_for_quiet(args.quiet_load)
            print(f"engines: round {round_ + 1}, {engine} (1-min load {load}) ...", file=sys.stderr)
            command = [sys.executable, __file__, "--engine", engine, "--gguf", str(gguf), "--model", args.model,
                       "--samples", str(args.samples), "--warmup", str(args.warmup),
                       "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            peaks = [r["peak_memory_bytes"] for rows in result["runs"].values() for r in rows if r["peak_memory_bytes"]]
            result["peak_memory_mb"] = (result.get("server_peak_memory_bytes") or max(peaks)) / 2**20
            result["load_at_start"] = load
            rounds[engine].append(result)
    reference = min(rounds["torch"], key=lambda r: summarize(r["runs"]["text"], None)["e2e_p50_ms"])["runs"]
    for engine, results in rounds.items():
        for result in results:
            result["summary"] = {k: summarize(rows, reference[k] if engine != "torch" else None) for k, rows in result["runs"].items()}
        # the round least disturbed by other work on the machine: lowest median end-to-end time
        best = min(results, key=lambda r: r["summary"]["text"]["e2e_p50_ms"])
        record["engines"][engine] = {**best, "rounds": [{"load_at_start": r["load_at_start"], "summary": r["summary"],
                                                         "peak_memory_mb": r["peak_memory_mb"]} for r in results]}
    atomic_write_text(out / "results.json", json.dumps(record, indent=1))
    atomic_write_text(out / "report.md", report(record))
    (out / "model.gguf").unlink()
    print(report(record))


if __name__ == "__main__":
    main()
