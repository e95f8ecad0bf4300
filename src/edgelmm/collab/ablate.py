"""`edgelmm collab ablate CONFIG.yaml`: switch each part of edge-cloud collaboration off and measure.

    name: collab-demo
    edge: {path: shapes-vlm-xs}
    cloud: {serve: {path: shapes-vlm-s}}      # or {url: http://HOST:8000/v1, model: NAME}
    tasks: [{name: shapes-vqa, samples: 200, seed: 0}]
    presets: [cloud_only, edge_only, baseline, no_confidence]
    rtts_ms: [0, 20, 80]                      # injected on the client side (collab.client)
    strategies: [max_prob, entropy, temperature, top_mass, ensemble]
    policy: {strategy: ensemble, aggregate: mean}     # the baseline's; its threshold is fitted
    calibration: {seed: 1, target_quality: 0.97}      # fitted on this seed, reported on the task's
                                              # (confidence_level: 0.9 to meet it on 90 % of resamples)

Presets: `cloud_only` (the cloud alone), `edge_only` (the edge alone), `baseline` (everything
on: routing with the policy fitted on the calibration seed, escalated requests answered by
draft-verify with the edge's own answer as the first drafts, the cloud's verify sessions and
the edge's prefix cache), `no_confidence` (every answer escalated), `draft_verify` (every request
by draft-verify: the cloud's own output; `draft_when: always`, so that the cell measures drafting
even where the cloud alone would be faster), `no_draft_verify` (the baseline, escalated requests
decoded by the cloud alone), `no_kv_cache` (the baseline through the generic verify protocol,
which keeps nothing in the cloud between rounds, and without the edge's prefix cache). Where the
cloud has no verify protocol, the presets that need one fail with the reason. Every cell — preset × task × RTT, plus the two calibration runs per
task — goes through the real path: the edge in process, the cloud over HTTP. `edge_only` does
not touch the network and runs once per task.

As `edgelmm bench`: each finished cell's requests are written to `cells/<cell>.jsonl`, then its
line is appended atomically to `results.jsonl`; a rerun skips finished cells, so a killed run
resumes; a folder holding cells made with other settings is refused unless `append`. After
every cell, `report.md` and the plots are rebuilt: accuracy against cloud share (one curve per
strategy, from the edge-only and cloud-only runs of the test seed, with each strategy's
threshold fitted on the calibration seed marked), latency p50/p90, and cloud tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from edgelmm.bench.metrics import percentile
from edgelmm.bench.runner import cell_sampling
from edgelmm.collab import calibrate
from edgelmm.collab.confidence import parse_strategy
from edgelmm.collab.policy import Policy, save_policy
from edgelmm.collab.session import CloudSpec, Session
from edgelmm.config import ModelSpec, SamplingParams, Schema, TaskSpec
from edgelmm.errors import EdgelmmError
from edgelmm.tasks import Task, get_task
from edgelmm.utils.io import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl_records

PRESETS = ("cloud_only", "edge_only", "baseline", "no_confidence", "draft_verify", "no_draft_verify", "no_kv_cache")
# what each preset changes in the config's policy; "fitted": routing with the calibration seed's threshold
PRESET_POLICIES: dict[str, dict[str, Any]] = {
    "cloud_only": {"mode": "cloud"},
    "edge_only": {"mode": "edge"},
    "baseline": {"fitted": True, "escalate_by": "draft_verify"},
    "no_confidence": {"mode": "escalate", "escalate_by": "draft_verify"},
    "draft_verify": {"mode": "draft_verify", "draft_when": "always"},
    "no_draft_verify": {"fitted": True, "escalate_by": "complete"},
    "no_kv_cache": {"fitted": True, "escalate_by": "draft_verify", "protocol": "generic", "edge_cache": False},
}
Preset = Literal["cloud_only", "edge_only", "baseline", "no_confidence", "draft_verify", "no_draft_verify", "no_kv_cache"]
RESULTS, CELLS = "results.jsonl", "cells"


class CalibrationSpec(Schema):
    seed: int = 1
    samples: int | None = Field(None, ge=1)  # default: as many as the task's
    target_quality: float | None = Field(None, gt=0, le=1)  # a share of the cloud's accuracy
    target_share: float | None = Field(None, ge=0, le=1)  # a share of requests sent to the cloud
    confidence_level: float | None = Field(None, gt=0, lt=1)  # met on this share of bootstrap resamples

    @model_validator(mode="after")
    def _one_target(self) -> CalibrationSpec:
        if self.target_quality is None and self.target_share is None:
            self.target_quality = 0.97
        if self.target_quality is not None and self.target_share is not None:
            raise ValueError("give one calibration target: target_quality or target_share")
        return self


class AblateConfig(Schema):
    name: str = "collab"
    edge: ModelSpec
    edge_backend: str = "torch"
    cloud: CloudSpec
    tasks: list[TaskSpec]
    presets: list[Preset] = Field(default_factory=lambda: list(PRESETS))
    rtts_ms: list[float] = Field(default_factory=lambda: [0.0])
    strategies: list[str] = Field(default_factory=lambda: ["max_prob", "entropy", "temperature", "top_mass", "ensemble"])
    policy: Policy = Field(default_factory=Policy)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_new_tokens=24))
    concurrency: int = Field(1, ge=1)
    warmup: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _check(self) -> AblateConfig:
        if any(r < 0 for r in self.rtts_ms):
            raise ValueError("rtts_ms must be >= 0")
        for spec in [*self.strategies, self.policy.strategy]:
            try:
                parse_strategy(spec)
            except EdgelmmError as exc:
                raise ValueError(str(exc)) from None
        return self


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cells(config: AblateConfig) -> list[dict[str, Any]]:
    """Every cell of the matrix, calibration runs first (the baseline needs their fit)."""
    settings = _digest({"edge": config.edge.model_dump(), "edge_backend": config.edge_backend,
                        "cloud": config.cloud.model_dump(exclude={"api_key"}), "sampling": config.sampling.model_dump(),
                        "policy": config.policy.model_dump(exclude={"fitted", "threshold", "mode"}),
                        # (a calibration without confidence_level keeps the digest it had before that field)
                        "calibration": config.calibration.model_dump(exclude={"confidence_level"} if
                                                                     config.calibration.confidence_level is None else None),
                        "warmup": config.warmup,
                        "concurrency": config.concurrency})
    cells = []
    for spec in config.tasks:
        task = get_task(spec)
        n = spec.samples or 200
        cal_n = config.calibration.samples or n
        for preset in ("edge_only", "cloud_only"):
            cells.append({"split": "calibration", "preset": preset, "task": task.label, "samples": cal_n,
                          "seed": config.calibration.seed, "rtt_ms": 0.0, "settings": settings})
        for preset in config.presets:
            for rtt in ([0.0] if preset == "edge_only" else config.rtts_ms):
                cells.append({"split": "test", "preset": preset, "task": task.label, "samples": n, "seed": spec.seed,
                              "rtt_ms": float(rtt), "settings": settings})
    return cells


def cell_name(cell: dict[str, Any]) -> str:
    task = cell["task"].replace(":", "_").replace("/", "_")
    return f"{cell['split']}-{cell['preset']}-{task}-n{cell['samples']}-s{cell['seed']}-rtt{cell['rtt_ms']:g}"


def _key(cell: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(cell.get(k) for k in ("split", "preset", "task", "samples", "seed", "rtt_ms", "settings"))


def _read(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS
    return [r for _, r in read_jsonl_records(path)] if path.exists() else []


def rows_of(out: Path, cell: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for _, r in read_jsonl_records(out / CELLS / f"{cell_name(cell)}.jsonl")]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    total = [r["total_ms"] for r in rows]
    edge = [r["edge_ms"] for r in rows if r["edge_ms"] is not None]
    cloud = [r["cloud_ms"] for r in rows if r["cloud_ms"] is not None]
    return {
        "accuracy": sum(r["score"] for r in rows) / n,
        "cloud_share": sum(r["served_by"] in ("cloud", "draft_verify") for r in rows) / n,
        # the cloud's forward passes: a verify round is one, a token the cloud decoded alone is one
        "cloud_passes": sum(r["draft_verify"]["cloud_forward_passes"] if r.get("draft_verify") else r["cloud_tokens"]
                            for r in rows),
        "fallback_share": sum(r["served_by"] == "edge_fallback" for r in rows) / n,
        "latency_p50_ms": percentile(total, 50), "latency_p90_ms": percentile(total, 90),
        "edge_p50_ms": percentile(edge, 50), "cloud_p50_ms": percentile(cloud, 50),
        "cloud_tokens": sum(r["cloud_tokens"] for r in rows), "edge_tokens": sum(r["edge_tokens"] for r in rows),
        "by_kind": {k: sum(r["score"] for r in rows if r["kind"] == k) / sum(r["kind"] == k for r in rows)
                    for k in sorted({r["kind"] for r in rows if r["kind"] is not None})},
    }


def split_samples(out: Path, records: list[dict[str, Any]], task: str, split: str) -> list[calibrate.Sample] | None:
    """A split's samples as the edge alone and the cloud alone answered them (RTT 0), or None
    while either cell is unfinished."""
    cells = {r["preset"]: r for r in records if r["split"] == split and r["task"] == task and r["rtt_ms"] == 0}
    if "edge_only" not in cells or "cloud_only" not in cells:
        return None
    return calibrate.samples_from(rows_of(out, cells["edge_only"]), rows_of(out, cells["cloud_only"]))


def fitted_policies(config: AblateConfig, out: Path, task: str) -> dict[str, Policy]:
    """Each strategy's policy, fitted on the task's calibration runs (also saved under policies/)."""
    samples = split_samples(out, _read(out), task, "calibration")
    if samples is None:
        return {}
    cal = config.calibration
    policies = {}
    stem = task.replace(":", "_")
    for spec in dict.fromkeys([*config.strategies, config.policy.strategy]):
        base = config.policy.model_copy(update={"strategy": spec})
        policies[spec] = calibrate.fit(base, samples, cal.target_share, cal.target_quality, {"task": task, "seed": cal.seed},
                                       cal.confidence_level)
        strategy = parse_strategy(spec)
        name = strategy.name if str(strategy) == strategy.name else f"{strategy.name}-{_digest(str(strategy))[:6]}"
        save_policy(policies[spec], out / "policies" / f"{stem}-{name}.yaml")
    save_policy(policies[config.policy.strategy], out / "policies" / f"{stem}-baseline.yaml")
    return policies


def _prepare(out: Path) -> None:
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    (out / "policies").mkdir(exist_ok=True)


def run_ablation(config: AblateConfig, out: str | Path, append: bool = False, progress: bool = True) -> Path:
    out = Path(out)
    tasks = {task.label: (spec, task) for spec, task in ((spec, get_task(spec)) for spec in config.tasks)}
    cells = _cells(config)
    records = _read(out)
    done = {_key(r) for r in records}
    other = [r for r in records if r.get("settings") != cells[0]["settings"]]
    if other and not append:
        raise EdgelmmError(f"{out} holds cells measured with other settings ({len(other)} of them)",
                           "choose another --out, or pass --append to keep both")
    todo = [c for c in cells if _key(c) not in done]
    if todo:
        if not out.parent.is_dir():
            raise EdgelmmError(f"{out.parent} does not exist", "create it, or choose another --out")
        _prepare(out)
        asyncio.run(_run_cells(config, out, todo, tasks, progress))
    return write_report(config, out)


async def _run_cells(config: AblateConfig, out: Path, todo: list[dict[str, Any]],
                     tasks: dict[str, tuple[TaskSpec, Task]], progress: bool) -> None:
    needs_cloud = any(c["preset"] != "edge_only" for c in todo)
    async with Session(config.edge, config.cloud if needs_cloud else None, config.edge_backend) as session:
        baselines: dict[str, Policy] = {}  # per task, fitted once its calibration cells are done
        for cell in todo:
            spec, task = tasks[cell["task"]]
            change = dict(PRESET_POLICIES[cell["preset"]])
            fitted, edge_cache = change.pop("fitted", False), change.pop("edge_cache", True)
            base = config.policy
            if fitted:
                if cell["task"] not in baselines:
                    baselines[cell["task"]] = fitted_policies(config, out, cell["task"])[config.policy.strategy]
                base = baselines[cell["task"]]
            policy = base.model_copy(update=change)
            session.edge_cache(edge_cache)
            params = cell_sampling(config, spec, task)
            samples = task.samples(cell["samples"], cell["seed"])
            if config.warmup:
                await session.run(samples[: config.warmup], task, policy, params, cell["rtt_ms"])
            with tqdm(total=len(samples), desc=cell_name(cell), disable=not progress, file=sys.stderr) as bar:
                started = time.perf_counter()
                rows = await session.run(samples, task, policy, params, cell["rtt_ms"], config.concurrency,
                                         lambda: bar.update(1))
                wall = time.perf_counter() - started
            atomic_write_text(out / CELLS / f"{cell_name(cell)}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            append_jsonl(out / RESULTS, {**cell, **_summary(rows), "policy": policy.label(), "wall_s": round(wall, 3)})
            write_report(config, out)


# ---------------------------------------------------------------- report


def _fmt(value: Any, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def _strategy_rows(config: AblateConfig, out: Path, task: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: its curve on the test seed and its calibration-seed threshold applied there."""
    samples = split_samples(out, records, task, "test")
    if samples is None:
        return []
    policies = fitted_policies(config, out, task)
    rows = []
    for spec in dict.fromkeys([*config.strategies, config.policy.strategy]):
        policy = policies.get(spec)
        strategy = policy.scorer if policy else parse_strategy(spec)
        routes = calibrate.curve(calibrate.confidences(strategy, samples, config.policy.aggregate, config.policy.first_k), samples)
        rows.append({"strategy": str(strategy), "curve": routes, "policy": policy,
                     "measured": calibrate.measure(policy, samples) if policy else None, **routes.summary()})
    return rows


def _plots(out: Path, records: list[dict[str, Any]], strategies_by_task: dict[str, list[dict[str, Any]]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig: Any, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        names.append(name)

    for task, strategies in strategies_by_task.items():
        if strategies:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            for s in strategies:
                line, = ax.plot(s["curve"].shares, s["curve"].accuracies, label=s["strategy"], lw=1.4)
                if s["measured"]:
                    ax.plot([s["measured"]["cloud_share"]], [s["measured"]["accuracy"]], "o", color=line.get_color())
            cloud = strategies[0]["curve"].cloud_accuracy
            ax.axhline(cloud, color="gray", ls="--", lw=0.8, label="cloud only")
            ax.axhline(0.97 * cloud, color="gray", ls=":", lw=0.8, label="97 % of cloud")
            ax.set(xlabel="share of requests sent to the cloud", ylabel="accuracy",
                   title=f"{task}: routing curves (test seed; dots: thresholds fitted on the calibration seed)")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
            save(fig, f"routing-{task.replace(':', '_')}.png")
    test = [r for r in records if r["split"] == "test"]
    if test:
        labels = [f"{r['preset']}\n{r['task']}\nrtt {r['rtt_ms']:g} ms" for r in test]
        for name, keys, ylabel in (("latency.png", ("latency_p50_ms", "latency_p90_ms"), "ms per request"),
                                   ("cloud_tokens.png", ("cloud_tokens",), "cloud tokens (all requests)")):
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(test)), 4))
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                ax.bar([i + j * width for i in range(len(test))], [r[key] or 0 for r in test], width, label=key)
            ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(test))], labels, fontsize=6)
            ax.set(ylabel=ylabel)
            if len(keys) > 1:
                ax.legend(fontsize=7)
            save(fig, name)
    return names


def write_report(config: AblateConfig, out: Path) -> Path:
    records = _read(out)
    lines = [f"# {config.name}: edge-cloud ablation", "",
             f"edge `{config.edge.display_name}` ({config.edge_backend}); cloud "
             f"{config.cloud.url or 'edgelmm serve ' + (config.cloud.serve.display_name if config.cloud.serve else '')}"
             f"; baseline policy `{config.policy.strategy}` [{config.policy.aggregate}], threshold fitted on seed "
             f"{config.calibration.seed} for " + (f"{config.calibration.target_quality:.0%} of the cloud's accuracy"
                                                  if config.calibration.target_quality else
                                                  f"a cloud share of {config.calibration.target_share:.0%}")
             + (f" on {config.calibration.confidence_level:.0%} of bootstrap resamples"
                if config.calibration.confidence_level else ""), "",
             "| split | preset | task | seed | RTT ms | accuracy | cloud share | fallbacks | p50 ms | p90 ms | edge p50 | cloud p50 | cloud tokens |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['split']} | {r['preset']} | {r['task']} | {r['seed']} | {r['rtt_ms']:g} | {_fmt(r['accuracy'], 100)} % "
                     f"| {_fmt(r['cloud_share'], 100)} % | {_fmt(r['fallback_share'], 100)} % | {_fmt(r['latency_p50_ms'])} "
                     f"| {_fmt(r['latency_p90_ms'])} | {_fmt(r['edge_p50_ms'])} | {_fmt(r['cloud_p50_ms'])} | {r['cloud_tokens']} |")
    strategies_by_task = {task: _strategy_rows(config, out, task, records) for task in dict.fromkeys(r["task"] for r in records)}
    for task, rows in strategies_by_task.items():
        if not rows:
            continue
        lines += ["", f"## {task}: strategies (test seed; thresholds fitted on seed {config.calibration.seed})", "",
                  f"edge alone {rows[0]['edge_accuracy']:.1%}, cloud alone {rows[0]['cloud_accuracy']:.1%} "
                  f"(edge/cloud = {rows[0]['edge_accuracy'] / max(rows[0]['cloud_accuracy'], 1e-9):.1%}).", "",
                  "| strategy | CPT(50 %) | CPT(80 %) | APGR | share for 97 % | share for 99 % | fitted threshold | measured share | measured accuracy | of cloud |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in rows:
            measured, policy = s["measured"], s["policy"]
            lines.append(
                f"| `{s['strategy']}` | {_fmt(s['cpt50'], 100)} % | {_fmt(s['cpt80'], 100)} % | {s['apgr']:.3f} "
                f"| {_fmt(s['share_for_97'], 100)} % | {_fmt(s['share_for_99'], 100)} % "
                f"| {_fmt(policy.threshold if policy else None, 1, 4)} | {_fmt(measured and measured['cloud_share'], 100)} % "
                f"| {_fmt(measured and measured['accuracy'], 100)} % "
                f"| {_fmt(measured and measured['accuracy'] / max(s['cloud_accuracy'], 1e-9), 100)} % |")
    plots = _plots(out, records, strategies_by_task) if records else []
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
