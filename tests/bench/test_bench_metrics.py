import pytest

from edgelmm.bench.metrics import MIN_DECODE_STEPS, percentile, summarize


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def row(repeat, score, ttft, decode, kind="color", peak=100, prompt=10, visual=4):
    return {
        "repeat": repeat, "score": score, "kind": kind, "ttft_s": ttft,
        "tpot_s": sorted(decode)[len(decode) // 2] if decode else None,
        "decode_tokens": len(decode), "decode_time_s": sum(decode), "e2e_s": ttft + sum(decode),
        "prompt_tokens": prompt, "visual_tokens": visual, "generated_tokens": len(decode) + 1,
        "peak_memory_bytes": peak,
    }


def test_summarize_accuracy_from_first_repeat_and_pooled_decode_speed():
    rows = [
        row(0, 1.0, 0.1, [0.01] * 60, kind="color"),
        row(0, 0.0, 0.3, [], kind="count", peak=None),
        row(1, 0.0, 0.2, [0.02] * 60, kind="color", peak=300),  # repeat: timing only
    ]
    s = summarize(rows, wall_s=2.0)
    assert s["accuracy"] == 0.5
    assert s["accuracy_by_kind"] == {"color": 1.0, "count": 0.0}
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["ttft_p90_s"] == pytest.approx(0.28)
    assert s["tpot_p50_s"] == pytest.approx(0.015)  # the single-token request has no TPOT
    assert s["decode_tok_s"] == pytest.approx(120 / 1.8) and s["decode_steps"] == 120
    assert s["throughput_tok_s"] == pytest.approx(123 / 2.0)
    assert s["peak_memory_bytes"] == 300
    assert s["counts"] == {"prompt_tokens": 10, "visual_tokens": 4, "generated_tokens": 41}


def test_too_few_decode_steps_give_no_decode_figures():
    """A handful of one-token answers measure noise: one slow step would swing tok/s threefold."""
    few = [row(0, 1.0, 0.1, [0.01, 0.01]) for _ in range(MIN_DECODE_STEPS // 2 - 1)] + [row(0, 1.0, 0.1, [0.03])]
    s = summarize(few, wall_s=1.0)
    assert s["decode_steps"] == MIN_DECODE_STEPS - 1
    assert s["decode_tok_s"] is None and s["tpot_p50_s"] is None and s["ttft_p50_s"] == pytest.approx(0.1)
    enough = summarize([*few, row(0, 1.0, 0.1, [0.01])], wall_s=1.0)
    assert enough["decode_steps"] == MIN_DECODE_STEPS and enough["decode_tok_s"] > 0 and enough["tpot_p50_s"] > 0


def test_summarize_without_decode_steps_or_kinds():
    s = summarize([row(0, 1.0, 0.1, [], kind=None, peak=None)], wall_s=0.1)
    assert s["decode_tok_s"] is None and s["tpot_p50_s"] is None
    assert s["peak_memory_bytes"] is None and s["accuracy_by_kind"] is None
