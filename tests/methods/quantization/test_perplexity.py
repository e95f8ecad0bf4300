"""Perplexity: the sliding window agrees with transformers' own loss; captions are scored given their image."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization import RTNConfig, quantize
from edgelmm.tasks import get_task
from edgelmm.tasks.perplexity import caption_perplexity, read_text, text_perplexity
from tests.tiny_models import CORPUS

TEXT = " ".join(CORPUS * 3)


def test_one_window_equals_the_models_own_loss(fresh) -> None:
    model, _, adapter = fresh("qwen2")
    ids = adapter.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    ppl = text_perplexity(model, adapter, TEXT, max_length=4096, stride=4096)
    assert ppl.tokens == ids.shape[1] - 1
    assert ppl.value == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_windows_score_every_token_once_with_context(fresh) -> None:
    model, _, adapter = fresh("llama")
    n = adapter.tokenizer(TEXT, return_tensors="pt")["input_ids"].shape[1]
    full = text_perplexity(model, adapter, TEXT, max_length=4096, stride=4096)
    windowed = text_perplexity(model, adapter, TEXT, max_length=32, stride=16)
    assert windowed.tokens == full.tokens == n - 1
    assert windowed.value == pytest.approx(full.value, rel=0.05)  # less context, nearly the same
    with pytest.raises(EdgelmmError, match="stride"):
        text_perplexity(model, adapter, TEXT, max_length=16, stride=32)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_caption_perplexity_moves_with_quantization(fresh, family: str) -> None:
    model, _, adapter = fresh(family)
    samples = [(s.prompt, s.images, s.reference) for s in get_task("shapes-caption").samples(3)]
    before = caption_perplexity(model, adapter, samples)
    assert before.tokens == sum(len(adapter.tokenizer(r, add_special_tokens=False)["input_ids"]) for *_, r in samples)
    quantize(model, adapter, RTNConfig(group_size=32), progress=False)
    after = caption_perplexity(model, adapter, samples)
    assert after.tokens == before.tokens and after.value != before.value and math.isfinite(after.value)


def test_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(EdgelmmError, match=r"b\.jsonl:1"):
        read_text(tmp_path / "b.jsonl")
    with pytest.raises(EdgelmmError, match="not found"):
        read_text(tmp_path / "none.txt")


def test_shapes_text_is_evaluation_captions_as_paragraphs() -> None:
    from edgelmm.bench.quant_eval import SHAPES_TEXT, evaluation_text, shapes_text
    from edgelmm.demo import shapes

    text = shapes_text(5)
    captions = [s.answer for s in shapes.generate(5, 2, task="caption")]
    assert text.split("\n\n") == captions and all(c.endswith(".") for c in captions)
    assert evaluation_text(SHAPES_TEXT, 5) == text and shapes_text(5, seed=3) != text
    assert evaluation_text("", 5) is None
    with pytest.raises(EdgelmmError, match="not an evaluation seed"):
        shapes_text(5, seed=shapes.TRAIN_SEED_BASE)
