import json

import pytest
from PIL import Image

from edgelmm.bench.report import cell_labels, format_table, markdown_table, read_results, write_report
from edgelmm.errors import EdgelmmError


def record(model="m-s", method="none", mode="bench", **extra):
    return {
        "mode": mode, "config": "demo", "model": model, "backend": "torch", "method": method, "task": "shapes-vqa",
        "samples": 8, "accuracy": 0.625, "accuracy_by_kind": {"color": 1.0, "count": 0.5},
        "ttft_p50_s": 0.0123, "ttft_p90_s": 0.02, "tpot_p50_s": 0.00456, "decode_tok_s": 219.3,
        "roofline_decode_tok_s": None, "e2e_p50_s": 0.05, "peak_memory_bytes": 300 * 2**20,
        "device": "cpu (x86_64, 2 threads)", "hardware": "cpu", "host": "box", "platform": "Linux x86_64",
        "versions": {"edgelmm": "0.1.0", "torch": "2.x"}, **extra,
    }


def write_results(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_format_table_aligns_and_shows_gaps():
    text = format_table([record(), record(model="m-l", method="fastv(k=2, keep=0.25)", peak_memory_bytes=None)])
    header, rule, first, second = text.splitlines()
    assert header.split()[:4] == ["model", "backend", "method", "task"]
    assert "62.5" in first and "12.3" in first and "4.56" in first and "300" in first
    assert len(rule) == len(first) == len(second)  # the device column is the widest
    assert " - " in second  # no roofline, no memory
    assert "TTFT" not in format_table([record()], accuracy_only=True)
    assert format_table([]).startswith("model")


def test_markdown_table_escapes_pipes_and_labels_show_what_differs():
    rows = [record(), record(method="a|b")]
    assert "a\\|b" in markdown_table(rows)
    assert cell_labels(rows) == ["none", "a|b"]
    assert cell_labels([record()]) == ["m-s"]


def test_write_report_builds_markdown_and_plots(tmp_path):
    write_results(tmp_path, [record(), record(model="m-l")])
    report = write_report(tmp_path).read_text()
    assert report.startswith("# edgelmm report: demo")
    assert "| m-l | torch | none | shapes-vqa | 8 | 62.5 |" in report
    assert "## Accuracy by kind" in report and "| m-s | 100.0 | 50.0 |" in report
    for png in ("accuracy.png", "latency.png"):
        assert Image.open(tmp_path / png).size[0] > 100
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_eval_report_has_no_latency(tmp_path):
    write_results(tmp_path, [record(mode="eval")])
    report = write_report(tmp_path).read_text()
    assert "TTFT" not in report and not (tmp_path / "latency.png").exists()


def test_hand_edited_results_name_the_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(record()) + "\n{oops\n")
    with pytest.raises(EdgelmmError, match=r"results\.jsonl:2: not a JSON line"):
        read_results(tmp_path)
