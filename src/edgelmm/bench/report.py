"""Reports from results.jsonl: a Markdown table, PNG plots, and the same table for a terminal.

Everything here reads finished rows only and writes atomically, so the report can be rebuilt
after every cell (and by hand, from a copied results file) without ever showing a torn file.
"""

from __future__ import annotations

import io
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgelmm.errors import EdgelmmError
from edgelmm.utils.io import atomic_write_bytes, atomic_write_text

RESULTS = "results.jsonl"
REPORT = "report.md"
ACCURACY_PNG = "accuracy.png"
LATENCY_PNG = "latency.png"
MISSING = "-"


def _num(key: str, scale: float = 1.0, digits: int = 1) -> Callable[[dict[str, Any]], str]:
    def fmt(row: dict[str, Any]) -> str:
        value = row.get(key)
        return MISSING if value is None else f"{value * scale:.{digits}f}"

    return fmt


def _text(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: MISSING if row.get(key) is None else str(row[key])


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], str]
    numeric: bool = True


_ID_COLUMNS = [Column(h, _text(h), numeric=False) for h in ("model", "backend", "method", "task")] + [
    Column("samples", _text("samples")),
    Column("accuracy %", _num("accuracy", 100)),
]
BENCH_COLUMNS: list[Column] = [
    *_ID_COLUMNS,
    Column("TTFT p50 ms", _num("ttft_p50_s", 1e3)),
    Column("TTFT p90 ms", _num("ttft_p90_s", 1e3)),
    Column("TPOT p50 ms", _num("tpot_p50_s", 1e3, 2)),
    Column("decode tok/s", _num("decode_tok_s")),
    Column("decode steps", _text("decode_steps")),
    Column("roofline tok/s", _num("roofline_decode_tok_s")),
    Column("e2e p50 ms", _num("e2e_p50_s", 1e3)),
    Column("peak MiB", _num("peak_memory_bytes", 2**-20, 0)),
    Column("device", _text("device"), numeric=False),
]
EVAL_COLUMNS: list[Column] = [*_ID_COLUMNS, Column("device", _text("device"), numeric=False)]


def _cells(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[list[str]]:
    return [[c.cell(row) for c in columns] for row in rows]


def format_table(rows: Sequence[dict[str, Any]], accuracy_only: bool = False) -> str:
    """A plain-text table for a terminal: one line per cell, numbers right-aligned."""
    columns = EVAL_COLUMNS if accuracy_only else BENCH_COLUMNS
    body = _cells(rows, columns)
    widths = [max([len(c.header), *(len(r[i]) for r in body)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if c.numeric else v.ljust(w) for v, w, c in zip(values, widths, columns)
        ).rstrip()

    return "\n".join([line([c.header for c in columns]), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column] = BENCH_COLUMNS) -> str:
    header = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"
    body = ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in _cells(rows, columns)]
    return "\n".join([header, rule, *body])


def cell_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Short names for plot axes: only the parts that differ between cells (the model if none)."""
    keys = [k for k in ("model", "backend", "method", "task") if len({str(r.get(k)) for r in rows}) > 1]
    return [" · ".join(str(r.get(k)) for k in keys or ["model"]) for r in rows]


def _kind_table(rows: Sequence[dict[str, Any]]) -> str | None:
    """Accuracy per question kind (shapes world kinds, a benchmark's categories), if any task has kinds."""
    kinds = sorted({k for r in rows for k in (r.get("accuracy_by_kind") or {})})
    if not kinds:
        return None
    columns = [Column("cell", lambda r: r["_label"], numeric=False)] + [
        Column(k, lambda r, k=k: MISSING if k not in (r.get("accuracy_by_kind") or {}) else f"{100 * r['accuracy_by_kind'][k]:.1f}")
        for k in kinds
    ]
    labelled = [{**r, "_label": label} for r, label in zip(rows, cell_labels(rows))]
    return markdown_table(labelled, columns)


def _png(draw: Callable[[Any], None], n_rows: int, width: float) -> bytes:
    """Render with a bare Figure (no pyplot): no global backend state, no display needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 1.2 + 0.35 * n_rows), layout="constrained")
    draw(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _bars(ax: Any, labels: list[str], values: list[float | None], title: str, xlabel: str) -> None:
    y = range(len(labels))
    ax.barh(y, [v or 0.0 for v in values], color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(v or 0.0, i, f" {v:.1f}" if v is not None else f" {MISSING}", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)


def accuracy_png(rows: Sequence[dict[str, Any]]) -> bytes:
    labels = cell_labels(rows)
    values = [100 * r["accuracy"] if r.get("accuracy") is not None else None for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        _bars(ax, labels, values, "Accuracy per cell", "accuracy (%)")
        ax.set_xlim(0, 112)  # room for the label of a 100 % bar
        ax.set_xticks(range(0, 101, 20))

    return _png(draw, len(rows), 7)


def latency_png(rows: Sequence[dict[str, Any]]) -> bytes:
    labels = cell_labels(rows)

    def ms(key: str) -> list[float | None]:
        return [1e3 * r[key] if r.get(key) is not None else None for r in rows]

    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2, sharey=True)
        _bars(left, labels, ms("ttft_p50_s"), "Time to first token (p50)", "ms")
        _bars(right, labels, ms("tpot_p50_s"), "Time per output token (p50)", "ms")
        right.tick_params(labelleft=False)

    return _png(draw, len(rows), 10)


def _header(rows: Sequence[dict[str, Any]]) -> list[str]:
    def distinct(key: str) -> str:
        return ", ".join(sorted({str(r[key]) for r in rows if r.get(key) is not None})) or MISSING

    versions = rows[-1].get("versions") or {}
    return [
        f"# edgelmm report: {distinct('config')}",
        "",
        f"- generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()}",
        f"- measured on: {distinct('host')} ({distinct('platform')})",
        f"- device: {distinct('device')}; hardware profile: {distinct('hardware')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- {len(rows)} cells from `{RESULTS}`; per-sample outputs under `samples/`",
    ]


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The finished cells in `out_dir` (none if there is no results file yet)."""
    path = Path(out_dir) / RESULTS
    rows = []
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EdgelmmError(
                f"{path}:{number}: not a JSON line ({exc.msg})",
                "it was edited by hand: fix or delete that line, or use a new output directory",
            ) from None
    return rows


def write_report(out_dir: str | Path) -> Path:
    """Rebuild report.md and the plots in `out_dir` from its results.jsonl; returns report.md."""
    out = Path(out_dir)
    rows = read_results(out)
    lines = _header(rows) if rows else ["# edgelmm report", "", "No finished cells yet."]
    if rows:
        # eval runs measure no latency worth plotting: accuracy columns and plot only
        eval_only = all(r.get("mode") == "eval" for r in rows)
        lines += ["", markdown_table(rows, EVAL_COLUMNS if eval_only else BENCH_COLUMNS), "", f"![accuracy]({ACCURACY_PNG})"]
        atomic_write_bytes(out / ACCURACY_PNG, accuracy_png(rows))
        if not eval_only:
            lines += ["", f"![latency]({LATENCY_PNG})"]
            atomic_write_bytes(out / LATENCY_PNG, latency_png(rows))
        if kinds := _kind_table(rows):
            lines += ["", "## Accuracy by kind (%)", "", kinds]
    atomic_write_text(out / REPORT, "\n".join(lines) + "\n")
    return out / REPORT
