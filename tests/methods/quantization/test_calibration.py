"""Calibration data: sources, blocks, padding, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization import CalibrationConfig, calibration_batches
from edgelmm.methods.quantization.calibration import calibration_texts
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny("qwen2")[1]


def test_shapes_captions_concatenate_into_exact_blocks(tokenizer) -> None:
    batches = calibration_batches(tokenizer, CalibrationConfig(source="shapes", num_samples=5, max_seq_len=40, batch_size=2))
    assert [b.input_ids.shape for b in batches] == [(2, 40), (2, 40), (1, 40)]
    assert all(b.attention_mask.all() for b in batches)
    text = next(calibration_texts(CalibrationConfig(source="shapes")))
    assert " at the " in text and text.endswith(".")  # a shapes-world caption


def test_text_and_jsonl_files(tokenizer, tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("What color is the circle?\n\nThe circle is red.\n\nHello there, how can I help?")
    ragged = calibration_batches(tokenizer, CalibrationConfig(source=str(txt), concat=False, num_samples=2))
    assert len(ragged) == 2 and all(b.input_ids.shape[0] == 1 for b in ragged)
    padded = calibration_batches(tokenizer, CalibrationConfig(source=str(txt), concat=False, padding=True, batch_size=8))
    (batch,) = padded
    assert batch.input_ids.shape[0] == 3 and not batch.attention_mask.all()
    assert batch.attention_mask.sum(1).tolist() == [len(tokenizer(t)["input_ids"]) for t in calibration_texts(
        CalibrationConfig(source=str(txt)))]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"sample {i} says the square is blue"}) for i in range(30)))
    blocks = calibration_batches(tokenizer, CalibrationConfig(source=str(jsonl), text_field="body", num_samples=3, max_seq_len=16))
    assert sum(b.input_ids.shape[0] for b in blocks) == 3
    short = calibration_batches(tokenizer, CalibrationConfig(source=str(txt), max_seq_len=10_000))
    assert len(short) == 1 and short[0].input_ids.shape[1] < 10_000  # one shorter block rather than none


def test_bad_sources_are_clear(tokenizer, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(EdgelmmError, match="calibration set is empty"):
        calibration_batches(tokenizer, CalibrationConfig(source=str(empty)))
    with pytest.raises(EdgelmmError, match="calibration source not found"):
        calibration_batches(tokenizer, CalibrationConfig(source=str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(EdgelmmError, match=r"bad\.jsonl:2: no string field 'text'"):
        calibration_batches(tokenizer, CalibrationConfig(source=str(bad)))
    with pytest.raises(EdgelmmError, match="max_seq_len must be at least 1"):
        CalibrationConfig(source="shapes", max_seq_len=0)


def test_datasets_folder_on_disk(tokenizer, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a red circle at the top left."] * 50}).save_to_disk(str(tmp_path / "ds"))
    batches = calibration_batches(tokenizer, CalibrationConfig(source=str(tmp_path / "ds"), num_samples=2, max_seq_len=20))
    assert sum(b.input_ids.shape[0] for b in batches) == 2
    with pytest.raises(EdgelmmError, match="not in the local cache"):
        calibration_batches(tokenizer, CalibrationConfig(source="hf:edgelmm-test/surely-not-cached"))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_conversations_calibrate_vlms(fresh, family: str) -> None:
    from edgelmm.methods.quantization import AWQConfig, QuantLinear, calibration_data, quantize

    model, _, adapter = fresh(family)
    batches = calibration_data(adapter, CalibrationConfig(source="shapes-images", num_samples=3))
    assert len(batches) == 3 and all(b.input_ids.shape[0] == 1 for b in batches)
    assert all("pixel_values" in b.extra and adapter.image_token_mask(b.input_ids).any() for b in batches)
    eos = adapter.tokenizer.eos_token_id
    assert all(int(b.input_ids[0, -1]) == eos for b in batches)  # the answer is there, then EOS
    quantize(model, adapter, AWQConfig(group_size=32, grid=4, clip_grid=4), batches, progress=False)
    assert isinstance(adapter.attention(0).q_proj, QuantLinear)


def test_image_calibration_needs_a_vlm(fresh) -> None:
    from edgelmm.methods.quantization import calibration_data

    _, _, adapter = fresh("qwen2")
    with pytest.raises(EdgelmmError, match="needs a vision-language model"):
        calibration_data(adapter, CalibrationConfig(source="shapes-images"))
