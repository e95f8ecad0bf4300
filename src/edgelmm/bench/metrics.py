"""Per-cell statistics from per-request rows: pure functions, so the numbers can be unit-tested.

A row is what the runner keeps for one request (see `runner._row`): score, ttft_s, tpot_s,
decode_tokens, decode_time_s, e2e_s, token counts and peak memory, plus the repeat it came
from. Accuracy uses the first repeat only (later repeats give the same answers when decoding
is greedy and would only weight the sample set differently); timings use every repeat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

MIN_DECODE_STEPS = 100  # fewer decode steps than this give no decode tok/s or TPOT: one slow step would swing them


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks, as numpy's default;
    None for no values, so that a cell without a measurement shows a gap instead of a zero."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: Any) -> float | None:
    """The mean of the values an engine reported (a server may not report prompt tokens)."""
    known = [v for v in values if v is not None]
    return fmean(known) if known else None


def summarize(rows: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Accuracy, latency percentiles, decode speed, throughput, memory and mean token counts.

    decode_tok_s pools every request: tokens after the first over the time they took, so long
    answers weigh more than short ones, as they do for a user waiting on them. With batching
    that is the speed of one sequence; throughput_tok_s (all generated tokens over the wall time
    of the generate calls, prefill included) shows what the batch gains. decode_steps counts the
    decode steps behind decode_tok_s and tpot_p50_s; with fewer than MIN_DECODE_STEPS both are
    None (short answers measure prefill, not decode).
    """
    if not rows:
        raise ValueError("no rows to summarize")
    first = [r for r in rows if r["repeat"] == 0]
    by_kind: dict[str, list[float]] = {}
    for r in first:
        if r.get("kind") is not None:
            by_kind.setdefault(r["kind"], []).append(r["score"])
    decode_tokens = sum(r["decode_tokens"] for r in rows)
    decode_time = sum(r["decode_time_s"] for r in rows)
    generated = sum(r["generated_tokens"] for r in rows)
    peaks = [r["peak_memory_bytes"] for r in rows if r["peak_memory_bytes"] is not None]
    ttft = [r["ttft_s"] for r in rows]
    decoded = decode_tokens >= MIN_DECODE_STEPS
    return {
        "accuracy": fmean(r["score"] for r in first),
        "accuracy_by_kind": {k: fmean(v) for k, v in sorted(by_kind.items())} or None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "tpot_p50_s": percentile([r["tpot_s"] for r in rows if r["tpot_s"] is not None], 50) if decoded else None,
        "decode_tok_s": decode_tokens / decode_time if decoded and decode_time > 0 else None,
        "decode_steps": decode_tokens,
        "throughput_tok_s": generated / wall_s if wall_s > 0 else None,
        "e2e_p50_s": percentile([r["e2e_s"] for r in rows], 50),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "counts": {key: _mean(r[key] for r in rows) for key in ("prompt_tokens", "visual_tokens", "generated_tokens")},
    }
