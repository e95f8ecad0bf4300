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
DEMO_CALIBRATION = "shapes"  # AWQ's calibration source when every model is a bundled demo model


def _demo_calibration(methods: list, models: list[str]) -> list:
    """AWQ without a calibration source gets the shapes world's captions, but only when every
    model is a bundled demo model (the library itself has no default: that is the user's call)."""
    import dataclasses

    from edgelmm.demo import DEMO_MODELS
    from edgelmm.methods.quantization import AWQConfig, CalibrationConfig

    if not models or not all(m in DEMO_MODELS for m in models):
        return methods
    return [dataclasses.replace(m, calibration=CalibrationConfig(source=DEMO_CALIBRATION))
            if isinstance(m, AWQConfig) and m.calibration is None else m for m in methods]


def _spec(**fields: object):
    """A ModelSpec from command-line values, with one-line errors (a bad --method, say)."""
    from edgelmm.config import ModelSpec, validate

    spec = validate(ModelSpec, {k: v for k, v in fields.items() if v is not None}, "command line")
    return spec.model_copy(update={"methods": _demo_calibration(spec.methods, [spec.path])})


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by bench and eval for a one-off run without a YAML file."""
    p.add_argument("config", nargs="?", help="benchmark matrix YAML, or a bundled one by name (demo, demo_gpu)")
    p.add_argument("--model", action="append", help="bundled name or local checkpoint dir (repeatable)")
    p.add_argument("--backend", action="append", help="engine (repeatable; default torch)")
    p.add_argument("--method", action="append", help="method spec, e.g. 'fastv(k=2,keep=0.25)' (repeatable)")
    p.add_argument("--task", action="append", help="task name (repeatable; default shapes-vqa)")
    p.add_argument("--base-url", help="the server's API root for --backend openai, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--task-file", help="JSONL file for the vqa-jsonl / mc-jsonl tasks")
    p.add_argument("--samples", type=int, help="samples per task")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--hardware", help="hardware profile for roofline estimates (configs/hardware)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--out", help="output directory (results.jsonl, report.md, plots); "
                   "default runs/<command>-<digest of the settings>, so the same command resumes there")
    p.add_argument("--append", action="store_true",
                   help="add to an output directory that holds cells measured with other settings")


def _with_base_url(config, base_url: str | None) -> list:
    """The models with --base-url as the openai backend's server address."""
    if base_url is None:
        return config.models
    if "openai" not in config.backends:
        raise EdgelmmError("--base-url is the openai backend's server address, and no --backend openai is run",
                           "add --backend openai (the model name is what the server serves)")
    return [m.model_copy(update={"options": {**m.options, "openai": {**m.options.get("openai", {}), "base_url": base_url}}})
            for m in config.models]


def _run_config(args: argparse.Namespace, mode: str):
    from edgelmm.bench.runner import bench_config_from_args, default_out
    from edgelmm.config import BenchConfig, load_yaml

    for flag in ("samples", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EdgelmmError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
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
    methods = _demo_calibration(config.methods, [m.path for m in config.models])
    config = config.model_copy(update={"methods": methods, "models": _with_base_url(config, args.base_url)})
    return config, Path(config.out) if config.out else default_out(config, mode)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_bench

    config, out = _run_config(args, "bench")
    rows = run_bench(config, out, debug=args.debug, append=args.append)
    print(format_table(rows))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_eval

    config, out = _run_config(args, "eval")
    rows = run_eval(config, out, debug=args.debug, append=args.append)
    print(format_table(rows, accuracy_only=True))
    print(f"\nresults: {out / 'results.jsonl'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgelmm.bench.report import format_table
    from edgelmm.bench.runner import run_bench
    from edgelmm.config import CONFIGS_DIR, BenchConfig, load_yaml

    if args.samples < 1:
        raise EdgelmmError(f"--samples must be at least 1, got {args.samples}")
    config = load_yaml(CONFIGS_DIR / "experiments" / "demo.yaml", BenchConfig)
    tasks = [t.model_copy(update={"samples": args.samples}) for t in config.tasks]
    config = config.model_copy(update={"tasks": tasks, "device": args.device})
    out = Path(args.out)
    print(f"edgelmm demo: {', '.join(m.path for m in config.models)} on {', '.join(t.name for t in config.tasks)}, "
          f"{args.samples} samples each, device {config.device}")
    rows = run_bench(config, out, debug=args.debug, append=args.append)
    print(format_table(rows))
    print(f"\nreport: {out / 'report.md'}  (plots beside it; rerun with a new --out to measure again)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from edgelmm.hardware import format_plan, plan_from_path

    plan = plan_from_path(args.model, args.hardware, weight_bits=args.weight_bits, context=args.context, batch=args.batch)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    for warning in plan.warnings:
        print(f"edgelmm: warning: {warning}", file=sys.stderr)
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


def _options(pairs: list[str] | None) -> dict[str, object]:
    """--option KEY=VALUE (repeatable); values are YAML scalars: 4096, true, 0.8, text."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EdgelmmError(f"bad --option '{pair}'", "write --option KEY=VALUE, e.g. --option n_ctx=4096")
        options[key] = yaml.safe_load(value)
    return options


def _limits(args: argparse.Namespace):
    """The server's limits from its flags (each must be positive); the address checked too."""
    from edgelmm.serve import Limits
    from edgelmm.serve.server import check_address

    for flag in ("max_tokens", "max_context", "max_batch_size", "max_body_mb", "max_image_mb", "max_connections",
                 "body_timeout_s", "verify_cache_mb"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise EdgelmmError(f"--{flag.replace('_', '-')} must be positive, got {value:g}")
    check_address(args.host, args.port)  # before the model loads: a port in use fails in a second
    return Limits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_tokens=args.max_tokens, max_context=args.max_context, max_batch_size=args.max_batch_size,
        max_connections=args.max_connections, body_timeout_s=args.body_timeout_s,
        verify_cache_bytes=int(args.verify_cache_mb * 2**20),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from edgelmm.serve import run_server

    limits = _limits(args)
    spec = _spec(path=args.model, device=args.device, dtype=args.dtype, methods=args.method or [], options=_options(args.option))
    run_server(spec, args.backend, args.host, args.port, args.api_key, args.allowed_local_media_path, limits,
               args.served_model_name, "debug" if args.debug else "info", access_log=args.access_log)
    return 0


# ---------------------------------------------------------------- edge-cloud collaboration


def _policy(args: argparse.Namespace):
    from edgelmm.collab.policy import load_policy

    policy = load_policy(args.policy)
    if args.threshold is not None:
        if not 0 <= args.threshold <= 1:
            raise EdgelmmError(f"--threshold {args.threshold:g} is outside [0, 1]", "a confidence threshold is between 0 and 1")
        policy = policy.model_copy(update={"threshold": args.threshold})
    return policy


def _cloud_settings(args: argparse.Namespace, policy):
    """The cloud client's settings from the flags; None where the policy needs no cloud."""
    from edgelmm.collab.client import CloudSettings

    if args.cloud is None:
        if policy.mode != "edge":
            raise EdgelmmError(f"policy mode '{policy.mode}' needs a cloud", "give --cloud URL, or --policy edge")
        return None
    if args.request_log:
        import logging

        handler = logging.FileHandler(args.request_log)
        logger = logging.getLogger("edgelmm.collab")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return CloudSettings(args.cloud, args.cloud_model, args.cloud_api_key, timeout_s=args.cloud_timeout_s,
                         retries=args.cloud_retries, rtt_ms=args.rtt_ms, loss=args.loss)


def _edge_spec(args: argparse.Namespace):
    return _spec(path=args.edge, device=args.device, dtype=args.dtype, options=_options(args.edge_option))


def cmd_collab(args: argparse.Namespace) -> int:
    return {"serve": _collab_serve, "run": _collab_run, "calibrate": _collab_calibrate, "ablate": _collab_ablate}[args.verb](args)


def _collab_serve(args: argparse.Namespace) -> int:
    from edgelmm.collab.server import check_cloud, wrap
    from edgelmm.serve import run_server

    limits = _limits(args)
    policy = _policy(args)
    settings = _cloud_settings(args, policy)
    cloud = check_cloud(settings) if settings is not None else None  # before the model loads
    run_server(_edge_spec(args), args.edge_backend, args.host, args.port, args.api_key, args.allowed_local_media_path,
               limits, args.served_model_name, "debug" if args.debug else "info", wrap=wrap(policy, cloud),
               access_log=args.access_log)
    return 0


def _collab_run(args: argparse.Namespace) -> int:
    from edgelmm.collab.chat import answer_once

    policy = _policy(args)
    routed = answer_once(_edge_spec(args), args.edge_backend, _cloud_settings(args, policy), policy, args.prompt,
                         args.image, args.max_tokens)
    print(routed.result.text)
    print(json.dumps(routed.info()), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from edgelmm.collab.chat import chat

    policy = _policy(args)
    chat(_edge_spec(args), args.edge_backend, _cloud_settings(args, policy), policy, args.max_tokens, args.system)
    return 0


def _collab_calibrate(args: argparse.Namespace) -> int:
    from edgelmm.collab.calibrate import calibrate_policy
    from edgelmm.collab.policy import Policy
    from edgelmm.config import TaskSpec, validate

    if args.samples < 1:
        raise EdgelmmError(f"--samples must be at least 1, got {args.samples}")
    base = validate(Policy, {"strategy": args.strategy, "aggregate": args.aggregate, "first_k": args.first_k,
                             **({"early_k": args.early_k} if args.early_k else {})}, "command line")
    task = validate(TaskSpec, {"name": args.task, "samples": args.samples, "seed": args.seed,
                               **({"path": args.task_file} if args.task_file else {}),
                               **({"max_new_tokens": args.max_tokens} if args.max_tokens else {})}, "command line")
    if Path(args.out).exists() and not args.overwrite:
        raise EdgelmmError(f"{args.out} already exists", "choose another --out or pass --overwrite")
    policy = calibrate_policy(_edge_spec(args), args.edge_backend, _cloud_settings(args, base), base, task,
                              args.target_share, args.target_quality, args.out, args.confidence_level)
    fitted = policy.fitted or {}
    print(f"{policy.label()}: cloud share {fitted['cloud_share']:.1%}, accuracy {fitted['accuracy']:.1%} on "
          f"{fitted['samples']} samples of seed {args.seed} (edge alone {fitted['edge_accuracy']:.1%}, "
          f"cloud alone {fitted['cloud_accuracy']:.1%})")
    print(f"policy: {args.out}")
    return 0


def _collab_ablate(args: argparse.Namespace) -> int:
    from edgelmm.collab.ablate import AblateConfig, run_ablation
    from edgelmm.config import load_yaml

    config = load_yaml(args.config, AblateConfig)
    if args.out is None:
        Path("runs").mkdir(exist_ok=True)  # the default home of runs, as bench's
    report = run_ablation(config, args.out or f"runs/{config.name}", args.append)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        return _export_onnx(args)
    from edgelmm.export.gguf import check_output, export_gguf
    from edgelmm.export.mmproj import export_mmproj

    if args.mmproj and Path(args.mmproj).resolve() == Path(args.out).resolve():
        raise EdgelmmError("--mmproj names the language model's own output file", "give the projector a file of its own")
    if args.mmproj:  # both outputs checked before either is written; a failed second removes the first
        check_output(args.out, args.overwrite)
        projector = export_mmproj(args.model, args.mmproj, "f16" if args.outtype == "f16" else "f32", args.overwrite)
    try:
        done = export_gguf(args.model, args.out, args.outtype, overwrite=args.overwrite)
    except BaseException:
        if args.mmproj:
            Path(args.mmproj).unlink(missing_ok=True)
        raise
    print(f"wrote {done.path} ({done.arch}, {done.outtype}, {done.tensors} tensors, vocab {done.vocab_size}, "
          f"{done.bytes / 1e6:.1f} MB)")
    if args.mmproj:
        print(f"wrote {projector.path} (vision tower and projector, {projector.outtype}, {projector.tensors} tensors, "
              f"{projector.bytes / 1e6:.1f} MB)")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from edgelmm.export.onnx import export_onnx, parse_lens, parse_size

    done = export_onnx(args.model, args.out, parse_lens(args.prefill_lens), args.max_kv, args.embedding_as_input,
                       parse_size(args.image_size), args.dtype, args.weights, args.text_only, args.overwrite)
    m = done.manifest
    parts = ["language model"] + (["embedding table" if "table" in (m["embedding"] or {}) else "embedding"] if m["embedding"] else [])
    if m["vision"]:
        parts.append("vision at {}x{}".format(*m["vision"]["image_size"]))
    print(f"wrote {done.path} ({', '.join(parts)}; {m['dtype']}, weights {m['weights']}, prefill {m['prefill_lens']}, "
          f"max KV {m['max_kv']}, {done.bytes / 1e6:.1f} MB)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgelmm.demo import DEMO_MODELS
    from edgelmm.methods.quantization import AWQConfig, CalibrationConfig, RTNConfig, quantize_checkpoint

    settings = dict(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, extra=tuple(args.extra))
    config = (AWQConfig if args.method == "awq" else RTNConfig)(**settings)  # bad settings fail first
    calibration = None
    if args.method == "awq":
        source = args.calibration or (DEMO_CALIBRATION if args.model in DEMO_MODELS else None)
        if source is None:
            raise EdgelmmError("AWQ needs calibration data",
                               "pass --calibration FILE (a .txt/.jsonl file, a datasets folder or hf:NAME[:SPLIT])")
        calibration = CalibrationConfig(
            source=source, num_samples=args.num_samples, max_seq_len=args.max_seq_len,
            concat=not args.no_concat, padding=args.padding, text_field=args.text_field,
        )
        config = AWQConfig(**settings, calibration=calibration)
    elif args.calibration is not None:
        raise EdgelmmError(f"--calibration is for --method awq; {args.method} uses no calibration data")
    summary = quantize_checkpoint(args.model, args.out, config, calibration, args.device, args.dtype, args.overwrite)
    before, after = summary["weight_bytes_before"], summary["weight_bytes_after"]
    print(f"{summary['method']}: {summary['quantized_layers']} linear layers in {summary['quantize_s']:.1f} s; "
          f"weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.3f}x)")
    print(f"checkpoint (compressed-tensors pack-quantized): {summary['out']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from edgelmm.methods.quantization import convert_to_awq

    out = convert_to_awq(args.checkpoint, args.out, args.overwrite)
    print(f"AutoAWQ GEMM checkpoint: {out}")
    return 0


def cmd_quant_eval(args: argparse.Namespace) -> int:
    from edgelmm.bench.quant_eval import compare, format_rows
    from edgelmm.methods import parse_method

    methods = _demo_calibration([parse_method(m) for m in args.method or []], args.model[:1])
    rows = compare(
        args.model, methods, task=args.task, samples=args.samples, perplexity=args.ppl,
        perplexity_samples=args.ppl_samples, text=args.text_ppl, text_samples=args.text_ppl_samples, device=args.device, dtype=args.dtype, out=args.out,
    )
    print(format_rows(rows))
    if args.out:
        print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """The HTTP server's flags, shared by `serve` and `collab serve`."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("EDGELMM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default $EDGELMM_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="accept local paths / file:// URLs as images, from this folder only")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens one request may generate")
    p.add_argument("--max-context", type=int, help="prompt + generated tokens (default: the model's)")
    p.add_argument("--max-batch-size", type=int, default=8, help="waiting requests run together")
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument("--max-image-mb", type=float, default=10.0)
    p.add_argument("--max-connections", type=int, default=64, help="open connections at once; more get 503")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="drop a request body that stalls this long")
    p.add_argument("--verify-cache-mb", type=float, default=512.0,
                   help="KV bytes kept for draft-verify sessions (least recently used evicted first)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no line per request on stderr (under many small requests, such as draft-verify rounds, "
                   "the log costs the server noticeable time)")


def _add_edge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge", required=True, help="the edge model: bundled name, checkpoint dir, or .gguf (--edge-backend llamacpp)")
    p.add_argument("--edge-backend", default="torch", help="in-process engine for the edge: torch, llamacpp")
    p.add_argument("--edge-option", action="append", help="edge engine option KEY=VALUE (repeatable), e.g. mmproj=FILE")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.add_argument("--policy", help="routing policy: a YAML file (edgelmm collab calibrate writes one) or a mode: "
                   "route, edge, cloud, escalate, draft-verify (default: route with the default policy)")
    p.add_argument("--threshold", type=float, help="override the policy's threshold (0..1)")


def _add_cloud_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--cloud", required=required, help="the cloud's API root, any OpenAI-compatible server, e.g. http://HOST:8000/v1")
    p.add_argument("--cloud-model", help="the model the cloud serves (default: its only one)")
    p.add_argument("--cloud-api-key", default=os.environ.get("EDGELMM_CLOUD_API_KEY"),
                   help="bearer key for the cloud (default $EDGELMM_CLOUD_API_KEY)")
    p.add_argument("--cloud-timeout-s", type=float, default=10.0,
                   help="bound on one cloud call, retries included; past it the edge answers")
    p.add_argument("--cloud-retries", type=int, default=2, help="tries after the first, for connection errors and 5xx")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="inject this round-trip delay on cloud calls (experiments)")
    p.add_argument("--loss", type=float, default=0.0, help="inject this share of dropped cloud tries (experiments)")
    p.add_argument("--request-log", help="append one JSON line per cloud call to this file")


def _add_collab_parsers(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve", help="an OpenAI-compatible edge server that asks the cloud when unsure")
    _add_edge_args(serve)
    _add_cloud_args(serve, required=False)
    _add_server_args(serve)
    run = verbs.add_parser("run", help="answer one request through the edge and the cloud, and say who answered")
    _add_edge_args(run)
    _add_cloud_args(run, required=False)
    run.add_argument("prompt", help="the question")
    run.add_argument("--image", action="append", default=[], help="an image file for the question (repeatable)")
    run.add_argument("--max-tokens", type=int, default=64)
    cal = verbs.add_parser("calibrate", help="fit a policy's threshold (and temperature) on a task split")
    _add_edge_args(cal)
    _add_cloud_args(cal)
    cal.add_argument("--task", default="shapes-vqa")
    cal.add_argument("--task-file", help="JSONL file for the vqa-jsonl / mc-jsonl tasks")
    cal.add_argument("--samples", type=int, default=200)
    cal.add_argument("--seed", type=int, default=1, help="the calibration split (report on another)")
    cal.add_argument("--strategy", default="max_prob", help="confidence strategy spec, e.g. entropy, temperature, "
                     "'top_mass(k=2)', 'ensemble(members=[\"max_prob\", \"entropy\"])'")
    cal.add_argument("--aggregate", choices=["mean", "min", "first"], default="mean")
    cal.add_argument("--first-k", type=int, default=4, help="tokens the 'first' aggregate uses")
    cal.add_argument("--early-k", type=int, help="decide after the edge's first k tokens")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-share", type=float, help="the share of requests the cloud may get (0..1)")
    target.add_argument("--target-quality", type=float, help="the share of the cloud's accuracy to keep (0..1]")
    cal.add_argument("--confidence-level", type=float,
                     help="meet the target on this share of bootstrap resamples of the split (e.g. 0.9), "
                          "so that it holds on new requests too; default: on the split itself")
    cal.add_argument("--max-tokens", type=int, help="answer limit (default: the task's)")
    cal.add_argument("--out", required=True, help="the policy file to write (YAML)")
    cal.add_argument("--overwrite", action="store_true")
    ablate = verbs.add_parser("ablate", help="presets x tasks x RTTs, resumable, with report.md and plots")
    ablate.add_argument("config", help="ablation YAML (see configs/experiments/collab_demo.yaml)")
    ablate.add_argument("--out", help="output folder (default runs/<name>)")
    ablate.add_argument("--append", action="store_true", help="add to a folder that holds cells made with other settings")
    for verb in (serve, run, cal, ablate):
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelmm", description="Edge LMM Optimizer: run, optimize and measure VLMs on edge devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--plugin", action="append", default=[],
                        help="import a plug-in module (dotted name or .py file) that registers models, methods, ... (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "demo": (cmd_demo, "benchmark the bundled demo VLMs on the CPU (no download)"),
        "bench": (cmd_bench, "accuracy, TTFT, TPOT, throughput and memory over a matrix"),
        "eval": (cmd_eval, "accuracy only, over the same tasks"),
        "plan": (cmd_plan, "memory plan and roofline for a model on a hardware profile"),
        "check-env": (cmd_check_env, "Python, torch, CUDA, memory and optional engines"),
        "models": (cmd_models, "bundled models and supported architectures"),
        "serve": (cmd_serve, "OpenAI-compatible HTTP server over an in-process backend"),
        "collab": (cmd_collab, "edge-cloud collaboration: serve, run, calibrate, ablate"),
        "chat": (cmd_chat, "an interactive terminal chat with the edge, asking the cloud when unsure"),
        "export": (cmd_export, "export a model to another engine's format (gguf, onnx)"),
        "quantize": (cmd_quantize, "quantize a model's weights (RTN or AWQ) and save a compressed-tensors checkpoint"),
        "convert": (cmd_convert, "rewrite a quantized checkpoint in AutoAWQ's GEMM layout (LMDeploy, vLLM awq)"),
        "quant-eval": (cmd_quant_eval, "float and quantized models side by side: accuracy, perplexity, memory, speed"),
    }
    for name, (fn, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(fn=fn)
        if name in ("bench", "eval"):
            _add_run_args(p)
        elif name == "demo":
            p.add_argument("--samples", type=int, default=32, help="samples per task and model")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
            p.add_argument("--out", default=DEMO_OUT)
            p.add_argument("--append", action="store_true",
                           help="add to an output directory that holds cells measured with other settings")
        elif name == "plan":
            p.add_argument("model", help="bundled name or checkpoint dir (only config.json is read)")
            p.add_argument("--hardware", required=True, help="profile name, see configs/hardware/")
            p.add_argument("--weight-bits", type=int, choices=[16, 8, 4], default=16)
            p.add_argument("--context", type=int, default=4096)
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--json", action="store_true")
        elif name == "serve":
            p.add_argument("model", help="bundled name, checkpoint dir, a .gguf file with --backend llamacpp, or an ONNX export dir with --backend onnx")
            p.add_argument("--backend", default="torch", help="in-process engine: torch, llamacpp, onnx, vllm, lmdeploy")
            p.add_argument("--method", action="append", help="method applied at load, e.g. 'fastv(k=2,keep=0.25)' (repeatable)")
            p.add_argument("--option", action="append", help="engine option KEY=VALUE, e.g. logits_all=true (repeatable)")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
            p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
            _add_server_args(p)
        elif name == "collab":
            _add_collab_parsers(p)
        elif name == "chat":
            _add_edge_args(p)
            _add_cloud_args(p, required=False)
            p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
            p.add_argument("--system", help="a system message for the whole chat")
        elif name == "export":
            formats = p.add_subparsers(dest="format", required=True)
            gguf = formats.add_parser("gguf", help="the language model of a Llama/Qwen2-family checkpoint, for llama.cpp")
            gguf.add_argument("model", help="bundled name or checkpoint dir")
            gguf.add_argument("out", help="output file, OUT.gguf")
            gguf.add_argument("--outtype", choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"], default="f32",
                              help="weight type; q4_0 and q4_k_m through llama.cpp's own quantizer")
            gguf.add_argument("--overwrite", action="store_true", help="replace OUT (and --mmproj) if it exists")
            gguf.add_argument("--mmproj", metavar="FILE.gguf",
                              help="also write the vision tower and projector (LLaVA) as llama.cpp's multimodal projector")
            gguf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
            onnx = formats.add_parser("onnx", help="language model (KV cache in/out) and vision encoder as ONNX graphs, "
                                      "for onnxruntime and ahead-of-time compilers")
            onnx.add_argument("model", help="bundled name or checkpoint dir (float, or W4A16 from edgelmm quantize)")
            onnx.add_argument("out", help="output directory")
            onnx.add_argument("--prefill-lens", default="1,8,96", help="prefill lengths to build profiles for (comma-separated)")
            onnx.add_argument("--max-kv", type=int, help="most cached tokens, prompt and answer (default: the model's context, at most 4096)")
            onnx.add_argument("--embedding-as-input", action="store_true",
                              help="the language model takes inputs_embeds; the embedding table is written beside it")
            onnx.add_argument("--image-size", metavar="WxH", help="the vision encoder's fixed input size (default: the model's)")
            onnx.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="activations and float weights")
            onnx.add_argument("--weights", choices=["int4", "16bit"],
                              help="int4: a W4A16 checkpoint's integers as MatMulNBits (its default); 16bit: float weights of --dtype")
            onnx.add_argument("--text-only", action="store_true", help="a VLM's language model alone")
            onnx.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
            onnx.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        elif name == "quantize":
            p.add_argument("model", help="bundled name or float checkpoint dir")
            p.add_argument("--method", choices=["rtn", "awq"], default="awq")
            p.add_argument("--bits", type=int, default=4, help="weight bits: 4 or 8")
            p.add_argument("--group-size", type=int, default=128)
            p.add_argument("--symmetric", action="store_true", help="no zero points (default: asymmetric)")
            p.add_argument("--extra", nargs="*", default=[], help="also quantize: lm_head, vision_tower, projector")
            p.add_argument("--calibration", help="awq calibration source: a .txt/.jsonl file, a datasets folder, "
                           "hf:NAME[:SPLIT] (cached), or a named source; bundled demo models default to 'shapes'")
            p.add_argument("--num-samples", type=int, default=128, help="calibration samples")
            p.add_argument("--max-seq-len", type=int, default=512, help="tokens per calibration sample")
            p.add_argument("--text-field", default="text", help="text field of .jsonl / dataset records")
            p.add_argument("--no-concat", action="store_true", help="one sample per text instead of joined blocks")
            p.add_argument("--padding", action="store_true", help="with --no-concat: pad samples into batches")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
            p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
            p.add_argument("--out", required=True, help="output checkpoint directory")
            p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        elif name == "convert":
            p.add_argument("checkpoint", help="compressed-tensors checkpoint made by edgelmm quantize")
            p.add_argument("--to", choices=["awq"], default="awq", help="target layout")
            p.add_argument("--out", required=True)
            p.add_argument("--overwrite", action="store_true")
        elif name == "quant-eval":
            p.add_argument("model", nargs="+", help="bundled names or checkpoint dirs (float or quantized); the first is the baseline")
            p.add_argument("--method", action="append", help="also the first model with this method, e.g. 'awq(bits=4, group_size=128)'")
            p.add_argument("--task", default="shapes-vqa", help="accuracy task ('' to skip)")
            p.add_argument("--samples", type=int, default=100)
            p.add_argument("--ppl", default="shapes-caption", help="captions given their picture: shapes-caption ('' to skip)")
            p.add_argument("--ppl-samples", type=int, default=100, help="pictures for the caption perplexity")
            p.add_argument("--text-ppl", default="shapes-text",
                           help="language model on text, sliding window: shapes-text (captions as plain text) or a .txt/.jsonl file ('' to skip)")
            p.add_argument("--text-ppl-samples", type=int, default=1000, help="captions in shapes-text")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
            p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
            p.add_argument("--out", help="write report.md and results.json here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from edgelmm.registry import load_plugin

        for plugin in args.plugin:
            load_plugin(plugin)
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
