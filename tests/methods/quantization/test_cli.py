"""The quantize, convert and quant-eval commands: end to end on tiny checkpoints, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelmm.cli import main
from tests.tiny_models import save_tiny


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return save_tiny("llava", tmp_path / "float")


def test_quantize_convert_and_compare(source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "awq"
    args = ["quantize", str(source), "--method", "awq", "--group-size", "32", "--calibration", "shapes", "--num-samples", "2", "--max-seq-len", "32", "--out", str(out)]
    assert main(args) == 0
    assert "awq w4 g32 asym: 14 linear layers" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    record = json.loads((out / "edgelmm_quantization.json").read_text())
    assert record["method"] == "awq w4 g32 asym" and record["calibration"]["num_samples"] == 2
    assert main(["convert", str(out), "--out", str(tmp_path / "autoawq")]) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    args = ["quant-eval", str(source), str(out), str(tmp_path / "autoawq"), "--method", "rtn(bits=4, group_size=32)",
            "--samples", "2", "--ppl-samples", "2", "--text-ppl-samples", "20", "--out", str(report)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "float" in table and "awq" in table and "float + rtn(bits=4, group_size=32)" in table
    rows = json.loads((report / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["float", "awq", "autoawq", "float + rtn(bits=4, group_size=32)"]
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert all(r["caption_perplexity"] > 0 and r["text_perplexity"] > 1 for r in rows)
    for key in ("caption_perplexity", "text_perplexity"):  # same weights, two layouts
        assert rows[1][key] == pytest.approx(rows[2][key], rel=1e-3)
    assert rows[3]["text_perplexity"] != rows[0]["text_perplexity"]  # quantization shows on text
    assert "caption ppl" in table and "text ppl" in table


def test_quant_eval_text_perplexity_from_a_file_or_skipped(source: Path, tmp_path: Path, capsys) -> None:
    from edgelmm.config import ModelSpec
    from edgelmm.models.loader import load_model
    from edgelmm.tasks.perplexity import text_perplexity
    from tests.tiny_models import CORPUS

    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS * 2))
    report = tmp_path / "report"
    args = ["quant-eval", str(source), "--task", "", "--ppl", "", "--text-ppl", str(text), "--out", str(report)]
    assert main(args) == 0
    [row] = json.loads((report / "results.json").read_text())
    model, _, adapter, _ = load_model(ModelSpec(path=str(source), device="cpu"))
    assert row["caption_perplexity"] is None and row["accuracy"] is None
    assert row["text_perplexity"] == pytest.approx(text_perplexity(model, adapter, text.read_text()).value, rel=1e-6)
    assert main([*args, "--text-ppl", ""]) == 0
    assert json.loads((report / "results.json").read_text())[0]["text_perplexity"] is None


def test_quant_eval_caption_perplexity_is_not_a_file(source: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "text.txt").write_text("a red circle.")
    assert main(["quant-eval", str(source), "--ppl", str(tmp_path / "text.txt")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("edgelmm: error: unknown caption perplexity") and "--text-ppl FILE" in last


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "3"], "unsupported weight bits: 3"),
        (["--method", "rtn", "--group-size", "48"], "group size 48 does not divide layer 'model.language_model.layers.0.self_attn.q_proj'"),
        (["--method", "rtn", "--calibration", "shapes"], "--calibration is for --method awq"),
        (["--calibration", "missing.txt"], "calibration source not found: missing.txt"),
        (["--calibration", "{tmp}/empty.txt"], "calibration set is empty"),
        ([], "AWQ needs calibration data"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "q"
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["quantize", str(source), "--out", str(out), *(a.format(tmp=tmp_path) for a in extra)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar, if any
    assert last.startswith("edgelmm: error:") and message in last
    assert not out.exists()


def test_existing_output_needs_overwrite(source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    out.mkdir()
    assert main(["quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(out)]) == 1
    assert "already exists — choose another output directory or pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["compressed-tensors", "autoawq"])
def test_backends_load_quantized_checkpoints_on_packed_kernels(source: Path, tmp_path: Path, capsys, layout: str) -> None:
    from edgelmm import Request, SamplingParams, load
    from edgelmm.methods.quantization.linear import QuantLinear
    from tests.tiny_models import make_image

    out = tmp_path / "rtn"
    assert main(["quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(out)]) == 0
    if layout == "autoawq":
        assert main(["convert", str(out), "--out", str(tmp_path / "awq")]) == 0
        out = tmp_path / "awq"
    with load(str(out), device="cpu") as backend:
        assert any(isinstance(m, QuantLinear) for m in backend.model.modules())
        [result] = backend.generate([Request.chat("What color?", images=[make_image()])], SamplingParams(max_new_tokens=3))
    assert result.counts.generated_tokens >= 1
