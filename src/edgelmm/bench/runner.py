"""The benchmark runner: a matrix of models × backends × methods × tasks, one results line per cell.

Each finished cell is appended atomically to `results.jsonl` (its per-sample outputs go to
`samples/<cell>.jsonl` first), and the report is rebuilt after it. A rerun into the same folder
skips every cell whose key is already there, so a run killed at any moment resumes and loses at
most the cell it was in. The key is (mode, model, backend, method, task, samples, seed,
device_type, settings): device_type is the requested device with "auto" resolved ("cpu" /
"cuda"), known before any model loads, so a finished cell costs nothing on resume; settings is a
digest of everything else that changes a result (checkpoint path, dtype, engine options, every
method, task file, batch size, warm-up, repeats, sampling). A folder that holds a cell made with
other settings is refused (`append=True` keeps both), so a rerun never passes off old numbers
as new ones.

Each cell decodes with the benchmark's sampling, except that a task may ask for a longer answer
limit (`Task.max_new_tokens`) when the user set none; a cell where more than a few answers hit
the limit says so, since their scores are then cut.

Everything that can be checked before loading a model is checked first (backends, methods,
task files, hardware profile, duplicate cells), so a typo fails in a second, not after an hour.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgelmm.backends.base import Backend, Request, Result
from edgelmm.backends.engines import engine_options
from edgelmm.bench.metrics import summarize
from edgelmm.bench.report import RESULTS, read_results, write_report
from edgelmm.config import BenchConfig, HardwareProfile, ModelSpec, SamplingParams, TaskSpec, validate
from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization import AWQConfig, QuantConfig
from edgelmm.registry import BACKENDS, TASKS
from edgelmm.tasks import Task, TaskSample, get_task
from edgelmm.utils.device import device_type
from edgelmm.utils.io import append_jsonl, atomic_write_text

KEY_FIELDS = ("mode", "model", "backend", "method", "task", "samples", "seed", "device_type", "settings")
SAMPLES_DIR = "samples"
LIMIT_WARN_SHARE = 0.05  # warn when more answers than this (and more than two) stop at max_new_tokens


@dataclass
class Cell:
    """One point of the matrix, with its samples already drawn (and task files already checked)."""

    mode: str  # "bench" or "eval"
    model: ModelSpec  # methods, device and dtype already set for this cell
    backend: str
    method: Any  # a Method object; str(method) is its spec
    task: Task
    seed: int
    samples: list[TaskSample]
    device_type: str
    sampling: SamplingParams
    settings_detail: dict[str, Any]  # what the settings digest covers, readable

    @property
    def settings(self) -> str:
        return hashlib.sha1(json.dumps(self.settings_detail, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def identity(self) -> tuple[Any, ...]:
        """The key without the settings: which point of the matrix this is."""
        return (self.mode, self.model.display_name, self.backend, str(self.method), self.task.label,
                len(self.samples), self.seed, self.device_type)

    @property
    def key(self) -> tuple[Any, ...]:
        return (*self.identity, self.settings)

    @property
    def label(self) -> str:
        return f"{self.model.display_name} / {self.backend} / {self.method} / {self.task.label}"

    @property
    def file_stem(self) -> str:
        """A readable, filesystem-safe name; the hash keeps cells apart that slug alike."""
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(map(str, self.key[1:]))).strip("-")[:120]
        return f"{slug}-{hashlib.sha1(repr(self.key).encode()).hexdigest()[:8]}"


def record_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) for k in KEY_FIELDS)


def _settings_detail(model: ModelSpec, task: Task, sampling: SamplingParams, config: BenchConfig) -> dict[str, Any]:
    return {
        "model_path": model.path, "dtype": model.dtype, "options": model.options,
        "trust_remote_code": model.trust_remote_code, "attn_implementation": model.attn_implementation,
        "methods": [str(m) for m in model.methods], "task_path": str(task.path) if task.path else None,
        "batch_size": config.batch_size, "warmup": config.warmup, "repeats": config.repeats,
        "sampling": sampling.model_dump(),
    }


def cell_sampling(config: Any, spec: TaskSpec, task: Task) -> SamplingParams:
    """The benchmark's sampling with the answer limit set for the task (`TaskSpec.max_new_tokens`),
    else the one set for the whole benchmark, else the task's own, else the default. `config` is
    a BenchConfig, or any config with a `sampling` field (`edgelmm collab ablate`'s)."""
    user_set = "sampling" in config.model_fields_set and "max_new_tokens" in config.sampling.model_fields_set
    limit = spec.max_new_tokens or (None if user_set else task.max_new_tokens)
    return config.sampling if limit is None else config.sampling.model_copy(update={"max_new_tokens": limit})


# ---------------------------------------------------------------- planning


def plan_cells(config: BenchConfig, mode: str = "bench") -> list[Cell]:
    """Check the whole matrix and draw every task's samples, before anything loads."""
    for name in config.backends:
        known = BACKENDS.get(name).known_options
        for model in config.models if known is not None else []:
            engine_options(model, known, name)  # a misspelled option fails here, not after an hour
    for method in config.methods:
        if isinstance(method, AWQConfig) and method.calibration is None:
            raise EdgelmmError(f"method {method}: AWQ needs calibration data",
                               "add calibration='FILE' (a .txt/.jsonl file, a datasets folder or hf:NAME)")
    tasks = []
    for spec in config.tasks:
        task = get_task(spec)
        tasks.append((task, spec, task.samples(spec.samples or config.samples, spec.seed)))
    cells = []
    for model in config.models:
        device = config.device if config.device != "auto" else model.device
        dtype = config.dtype if config.dtype != "auto" else model.dtype
        for backend in config.backends:
            for method in config.methods:
                spec = model.model_copy(update={"methods": [*model.methods, method], "device": device, "dtype": dtype})
                for task, task_spec, samples in tasks:
                    sampling = cell_sampling(config, task_spec, task)
                    cells.append(Cell(mode, spec, backend, method, task, task_spec.seed, samples, device_type(device),
                                      sampling, _settings_detail(spec, task, sampling, config)))
    seen: set[tuple[Any, ...]] = set()
    for cell in cells:
        if cell.identity in seen:
            raise EdgelmmError(
                f"two cells of the matrix are the same: {cell.label}",
                "give models distinct 'name's and list each task, backend and method once",
            )
        seen.add(cell.identity)
    return cells


def _changed(old: dict[str, Any], cell: Cell) -> str:
    """Which settings an earlier record of this cell was made with, where they differ from now."""
    before = old.get("settings_detail") or {}
    diffs = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in cell.settings_detail.items() if before.get(k) != v]
    return "; ".join(diffs[:3]) or "settings recorded by an older edgelmm"


def check_out_dir(cells: Sequence[Cell], records: Sequence[dict[str, Any]], out: Path) -> None:
    """Refuse a folder holding a cell of this matrix measured with other settings."""
    keys = {record_key(r) for r in records}
    for cell in cells:
        if cell.key in keys:
            continue
        old = next((r for r in records if record_key(r)[: len(cell.identity)] == cell.identity), None)
        if old is not None:
            raise EdgelmmError(
                f"{out} already holds {cell.label} measured with other settings ({_changed(old, cell)})",
                "write to a new --out, or pass --append to keep both results in this folder",
            )


def default_out(config: BenchConfig, mode: str) -> Path:
    """runs/<mode>-<digest of the config>: the same command resumes in the same folder, and a
    different experiment never lands in it."""
    digest = hashlib.sha1(config.model_dump_json(exclude={"out"}).encode()).hexdigest()[:8]
    return Path("runs") / f"{config.name if config.name != 'bench' else mode}-{digest}"


# ---------------------------------------------------------------- hardware and roofline


def _hardware(config: BenchConfig, device_type: str) -> HardwareProfile | None:
    """The profile named in the config (bundled name or YAML path), else the one matching the device."""
    import torch

    from edgelmm.hardware import guess_profile, load_profile

    if config.hardware:
        return load_profile(config.hardware)
    if device_type == "cuda" and not torch.cuda.is_available():
        return None  # the backend says so, in one clear line, when it loads
    return guess_profile(device_type)


def _weight_bits(cell: Cell) -> int:
    """The weight bits a quantization method of the cell stores, else 16."""
    return next((m.bits for m in cell.model.methods if isinstance(m, QuantConfig)), 16)


def _roofline(cell: Cell, profile: HardwareProfile | None, context: float) -> float | None:
    """Decode tok/s that the device's memory bandwidth (and peak compute) allow at this context.

    None where it cannot be computed: no profile, or no local config.json of a supported family
    (e.g. a model id served by a remote engine). The hardware model counts 16-bit weights and KV
    cache; a float32 run moves exactly twice those bytes, so it is bounded with half the bandwidth.
    """
    if profile is None:
        return None
    import torch

    from edgelmm.hardware import roofline_decode_tok_s
    from edgelmm.models.loader import resolve_model_path
    from edgelmm.utils.device import resolve_dtype

    try:
        if resolve_dtype(cell.model.dtype, torch.device(cell.device_type)) == torch.float32:
            memory = profile.memory.model_copy(update={"bandwidth_gbs": profile.memory.bandwidth_gbs / 2})
            profile = profile.model_copy(update={"memory": memory})
        path = resolve_model_path(cell.model.path)
        return roofline_decode_tok_s(path, profile, weight_bits=_weight_bits(cell), context=max(1, round(context)))
    except EdgelmmError:
        return None


# ---------------------------------------------------------------- measuring one cell


def _row(repeat: int, sample: TaskSample, result: Result, task: Task) -> dict[str, Any]:
    score = task.score(result.text, sample)
    return {
        "repeat": repeat, "id": sample.id, "kind": sample.kind,
        "prompt": sample.prompt, "reference": sample.reference, "prediction": result.text,
        "score": score, "correct": score == 1.0, "finish_reason": result.finish_reason,
        "ttft_s": result.timings.ttft_s, "tpot_s": result.timings.tpot_s,
        "decode_tokens": len(result.timings.decode_s), "decode_time_s": sum(result.timings.decode_s),
        "e2e_s": result.timings.e2e_s,
        "prompt_tokens": result.counts.prompt_tokens, "visual_tokens": result.counts.visual_tokens,
        "generated_tokens": result.counts.generated_tokens, "peak_memory_bytes": result.peak_memory_bytes,
    }


def _generate(backend: Backend, batch: Sequence[TaskSample], sampling: SamplingParams) -> list[Result]:
    results = backend.generate([Request.chat(s.prompt, s.images, id=s.id) for s in batch], sampling)
    if len(results) != len(batch):
        raise EdgelmmError(f"backend '{backend.name}' returned {len(results)} results for {len(batch)} requests")
    return results


def _batches(samples: Sequence[TaskSample], size: int) -> list[Sequence[TaskSample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _measure(backend: Backend, cell: Cell, config: BenchConfig, progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Warm-up (not kept), then every sample `repeats` times; returns the rows and generate wall time."""
    warmup = [cell.samples[i % len(cell.samples)] for i in range(config.warmup)]
    for batch in _batches(warmup, config.batch_size):
        _generate(backend, batch, cell.sampling)
    rows: list[dict[str, Any]] = []
    wall_s = 0.0
    total = len(cell.samples) * config.repeats
    with tqdm(total=total, desc=cell.label, unit="sample", disable=not progress, file=sys.stderr) as bar:
        for repeat in range(config.repeats):
            for batch in _batches(cell.samples, config.batch_size):
                start = time.perf_counter()
                results = _generate(backend, batch, cell.sampling)
                wall_s += time.perf_counter() - start
                rows += [_row(repeat, s, r, cell.task) for s, r in zip(batch, results)]
                bar.update(len(batch))
    return rows, wall_s


def _versions() -> dict[str, str]:
    import edgelmm

    found = {"edgelmm": edgelmm.__version__}
    for package in ("torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record(cell: Cell, config: BenchConfig, backend: Backend, rows: list[dict[str, Any]], wall_s: float,
            hardware: HardwareProfile | None, started_at: str, samples_file: str) -> dict[str, Any]:
    summary = summarize(rows, wall_s)
    counts = summary["counts"]
    context = (counts["prompt_tokens"] or 0) + counts["generated_tokens"] / 2  # mean context over decode steps
    return {
        "mode": cell.mode, "config": config.name,
        "model": cell.model.display_name, "model_path": cell.model.path, "backend": cell.backend,
        "method": str(cell.method), "methods": [str(m) for m in cell.model.methods],
        "task": cell.task.label, "task_path": str(cell.task.path) if cell.task.path else None,
        "samples": len(cell.samples), "seed": cell.seed,
        "device": backend.device_name(), "device_type": cell.device_type, "dtype": cell.model.dtype,
        "hardware": hardware.name if hardware else None,
        "batch_size": config.batch_size, "warmup": config.warmup, "repeats": config.repeats,
        "sampling": cell.sampling.model_dump(), "settings": cell.settings, "settings_detail": cell.settings_detail,
        **summary,
        "roofline_decode_tok_s": _roofline(cell, hardware, context) if cell.mode == "bench" else None,
        "started_at": started_at, "finished_at": _now(),
        "host": platform.node(), "platform": f"{platform.system()} {platform.machine()}",
        "versions": _versions(), "samples_file": samples_file,
    }


# ---------------------------------------------------------------- the matrix


def _fail(cell: Cell, message: str, hint: str | None, resumable: bool) -> EdgelmmError:
    resume = "finished cells are kept: rerun the same command to resume" if resumable else None
    return EdgelmmError(f"cell {cell.label} failed: {message}", "; ".join(h for h in (hint, resume) if h) or None)


def _warn_cut(cell: Cell, rows: Sequence[dict[str, Any]]) -> None:
    cut = sum(r["finish_reason"] == "length" for r in rows)
    if cut > max(2, LIMIT_WARN_SHARE * len(rows)):
        tqdm.write(f"edgelmm: warning: {cut} of {len(rows)} answers of {cell.label} stopped at max_new_tokens="
                   f"{cell.sampling.max_new_tokens}: their scores are cut; raise --max-new-tokens", file=sys.stderr)


def _run(config: BenchConfig, out_dir: str | Path | None, mode: str, progress: bool, debug: bool,
         append: bool) -> list[dict[str, Any]]:
    import torch

    out = Path(out_dir or config.out or default_out(config, mode))
    cells = plan_cells(config, mode)
    hardware = {t: _hardware(config, t) for t in {c.device_type for c in cells}}
    earlier = read_results(out)
    if not append:
        check_out_dir(cells, earlier, out)
    done = {record_key(r): r for r in earlier}
    records: dict[tuple[Any, ...], dict[str, Any]] = {}
    # Cells of one (model, backend, method) share one load; cells finished earlier need none.
    for _, group in groupby(cells, key=lambda c: (c.model.display_name, c.backend, str(c.method))):
        group = list(group)
        for cell in group:
            if cell.key in done:
                records[cell.key] = done[cell.key]
                if progress:
                    tqdm.write(f"{cell.label}: finished earlier, skipped", file=sys.stderr)
        pending = [c for c in group if c.key not in done]
        if not pending:
            continue
        backend = BACKENDS.get(pending[0].backend)()
        cell = pending[0]
        try:
            with backend:
                backend.load(cell.model)
                for cell in pending:
                    started_at = _now()
                    rows, wall_s = _measure(backend, cell, config, progress)
                    _warn_cut(cell, rows)
                    samples_file = f"{SAMPLES_DIR}/{cell.file_stem}.jsonl"
                    atomic_write_text(out / samples_file, "".join(json.dumps(r) + "\n" for r in rows))
                    record = _record(cell, config, backend, rows, wall_s, hardware[cell.device_type], started_at, samples_file)
                    append_jsonl(out / RESULTS, record)
                    records[cell.key] = record
                    write_report(out)
        except EdgelmmError as exc:
            raise _fail(cell, exc.message, exc.hint, bool(records)) from (exc if debug else None)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            hint = "lower batch_size or max_new_tokens, or quantize the model"
            raise _fail(cell, "out of memory", hint, bool(records)) from (exc if debug else None)
    if not (out / "report.md").exists():
        write_report(out)  # every cell was finished earlier: still leave a report behind
    return [records[c.key] for c in cells]


def run_bench(config: BenchConfig, out_dir: str | Path | None = None, progress: bool = True, debug: bool = False,
              append: bool = False) -> list[dict[str, Any]]:
    """Measure every cell of the matrix (resuming from `out_dir`); returns one record per cell.

    `out_dir` defaults to config.out, then `default_out` (runs/<name>-<digest of the config>).
    Records are in matrix order and include cells finished by an earlier run with the same
    settings; a folder holding a cell measured with other settings is refused unless `append`.
    A cell failing with an EdgelmmError (or running out of memory) stops the run with one line
    naming the cell; finished cells stay.
    """
    return _run(config, out_dir, "bench", progress, debug, append)


def run_eval(config: BenchConfig, out_dir: str | Path | None = None, progress: bool = True, debug: bool = False,
             append: bool = False) -> list[dict[str, Any]]:
    """Accuracy over the same tasks through the same code path: no warm-up, one repeat, no roofline."""
    return _run(config.model_copy(update={"warmup": 0, "repeats": 1}), out_dir, "eval", progress, debug, append)


def bench_config_from_args(
    models: str | Sequence[str],
    backends: str | Sequence[str] = "torch",
    methods: str | Sequence[str] = "none",
    tasks: str | Sequence[str] = "shapes-vqa",
    task_file: str | None = None,
    samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    hardware: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    out: str | None = None,
    name: str = "bench",
) -> BenchConfig:
    """A one-off matrix from command-line values, validated like a YAML file (errors name the flag's key).

    `task_file` goes to the file-based tasks (vqa-jsonl, mc-jsonl) of the list; None values keep
    BenchConfig's defaults.
    """
    def as_list(value: str | Sequence[str]) -> list[str]:
        return [value] if isinstance(value, str) else list(value)

    task_names = as_list(tasks)
    file_tasks = [t for t in task_names if t in TASKS and TASKS.get(t).needs_path]
    if task_file is not None and not file_tasks:
        raise EdgelmmError(
            f"a task file was given ({task_file}) but no task reads one",
            "add a file task, e.g. --task vqa-jsonl or --task mc-jsonl",
        )
    data: dict[str, Any] = {
        "name": name, "models": as_list(models), "backends": as_list(backends), "methods": as_list(methods),
        "tasks": [{"name": t, "path": task_file if t in file_tasks else None} for t in task_names],
        "device": device, "dtype": dtype, "hardware": hardware, "out": out,
        "samples": samples, "batch_size": batch_size,
    }
    if max_new_tokens is not None:
        data["sampling"] = {"max_new_tokens": max_new_tokens}
    return validate(BenchConfig, {k: v for k, v in data.items() if v is not None}, "command line")
