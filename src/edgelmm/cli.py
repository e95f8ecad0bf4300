"""The `edgelmm` command: parses, calls library functions, prints. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgelmm.errors import EdgelmmError

DEMO_OUT = "runs/demo"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by bench and eval for a one-off run without a YAML file."""
    p.add_argument("config", nargs="?", help="benchmark matrix YAML (configs/experiments/*.yaml)")
    p.add_argument("--model", action="append", help="bundled name or local checkpoint dir (repeatable)")
    p.add_argument("--backend", action="append", help="engine (repeatable; default torch)")
    p.add_argument("--method", action="append", help="method spec, e.g. 'fastv(k=2,keep=0.25)' (repeatable)")
    p.add_argument("--task", action="append", help="task name (repeatable; default shapes-vqa)")
    p.add_argument("--task-file", help="JSONL file for the vqa-jsonl / mc-jsonl tasks")
    p.add_argument("--samples", type=int, help="samples per task")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--hardware", help="hardware profile for roofline estimates (configs/hardware)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--out", help="output directory (results.jsonl, report.md, plots)")


def _run_config(args: argparse.Namespace, default_out: str):
    from edgelmm.bench.runner import bench_config_from_args
    from edgelmm.config import BenchConfig, load_yaml

    if args.config:
        config = load_yaml(args.config, BenchConfig)
        overrides = {
            k: v
            for k, v in {
                "device": args.device, "dtype": args.dtype, "hardware": args.hardware,
                "batch_size": args.batch_size, "out": args.out,
            }.items()
            if v is not None
        }
        if args.samples is not None:
            overrides["samples"] = args.samples
            overrides["tasks"] = [t.model_copy(update={"samples": args.samples}) for t in config.tasks]
        if args.max_new_tokens is not None:
            overrides["sampling"] = config.sampling.model_copy(update={"max_new_tokens": args.max_new_tokens})
        config = config.model_copy(update=overrides)
    else:
        if not args.model:
            raise EdgelmmError("no model given", "pass a config YAML or --model NAME_OR_PATH")
        config = bench_config_from_args(
            models=args.model,
            backends=args.backend or ["torch"],
            methods=args.method or ["none"],
            tasks=args.task or ["shapes-vqa"],
            task_file=args.task_file,
            samples=args.samples,
            device=args.device or "auto",
            dtype=args.dtype or "auto",
            hardware=args.hardware,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            out=args.out,
        )
    return config, Path(config.out or args.out or default_out)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_bench

    config, out = _run_config(args, "runs/bench")
    rows = run_bench(config, out, debug=args.debug)
    print(format_table(rows))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_eval

    config, out = _run_config(args, "runs/eval")
    rows = run_eval(config, out, debug=args.debug)
    print(format_table(rows, accuracy_only=True))
    print(f"\nresults: {out / 'results.jsonl'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_bench
    from edgelmm.config import CONFIGS_DIR, BenchConfig, load_yaml

    config = load_yaml(CONFIGS_DIR / "experiments" / "demo.yaml", BenchConfig)
    tasks = [t.model_copy(update={"samples": args.samples}) for t in config.tasks]
    config = config.model_copy(update={"tasks": tasks, "device": args.device})
    out = Path(args.out)
    print(f"edgelmm demo: {', '.join(m.path for m in config.models)} on {config.tasks[0].name}, "
          f"{config.tasks[0].samples} samples, device {config.device}")
    rows = run_bench(config, out, debug=args.debug)
    print(format_table(rows))
    print(f"\nreport: {out / 'report.md'}  (plots beside it; rerun with a new --out to measure again)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from edgelmm.hardware import format_plan, plan_from_path

    plan = plan_from_path(args.model, args.hardware, weight_bits=args.weight_bits, context=args.context, batch=args.batch)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    if not plan.fits:
        raise EdgelmmError(
            f"{plan.model} does not fit {plan.hardware}: needs {plan.total_bytes / 1e9:.2f} GB, "
            f"{plan.usable_bytes / 1e9:.2f} GB usable",
            "try --weight-bits 4, a shorter --context or a smaller --batch",
        )
    return 0


def cmd_check_env(args: argparse.Namespace) -> int:
    from edgelmm.env import environment_table

    print(environment_table())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from edgelmm.env import models_table

    print(models_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelmm", description="Edge LMM Optimizer: run, optimize and measure VLMs on edge devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "demo": (cmd_demo, "benchmark the bundled demo VLMs on the CPU (no download)"),
        "bench": (cmd_bench, "accuracy, TTFT, TPOT, throughput and memory over a matrix"),
        "eval": (cmd_eval, "accuracy only, over the same tasks"),
        "plan": (cmd_plan, "memory plan and roofline for a model on a hardware profile"),
        "check-env": (cmd_check_env, "Python, torch, CUDA, memory and optional engines"),
        "models": (cmd_models, "bundled models and supported architectures"),
    }
    for name, (fn, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(fn=fn)
        if name in ("bench", "eval"):
            _add_run_args(p)
        elif name == "demo":
            p.add_argument("--samples", type=int, default=32, help="shapes-vqa samples per model")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
            p.add_argument("--out", default=DEMO_OUT)
        elif name == "plan":
            p.add_argument("model", help="bundled name or checkpoint dir (only config.json is read)")
            p.add_argument("--hardware", required=True, help="profile name, see configs/hardware/")
            p.add_argument("--weight-bits", type=int, choices=[16, 8, 4], default=16)
            p.add_argument("--context", type=int, default=4096)
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except EdgelmmError as exc:
        if args.debug:
            raise
        print(f"edgelmm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgelmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
