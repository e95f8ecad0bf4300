"""The shapes world: determinism, balance, and answers that follow from the drawn scene."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from edgelmm.demo import DEMO_MODELS, checkpoint_path, shapes


def _fingerprint(samples: list[shapes.Sample]) -> list[tuple]:
    return [(s.question, s.answer, s.kind, s.image.tobytes()) for s in samples]


def test_same_seed_same_samples_other_seed_other_samples():
    assert _fingerprint(shapes.generate(20, seed=7)) == _fingerprint(shapes.generate(20, seed=7))
    assert _fingerprint(shapes.generate(20, seed=7)) != _fingerprint(shapes.generate(20, seed=8))
    assert _fingerprint(shapes.generate(5, 7, "caption")) == _fingerprint(shapes.generate(5, 7, "caption"))


def test_kinds_are_balanced_and_yes_no_roughly_even():
    samples = shapes.generate(500, seed=3)
    assert Counter(s.kind for s in samples) == {kind: 100 for kind in shapes.VQA_KINDS}
    yes = sum(s.answer == "yes" for s in samples if s.kind == "exists")
    assert 35 <= yes <= 65
    assert {s.kind for s in shapes.generate(10, 3, "caption")} == {"caption"}


def test_unknown_task_is_rejected_clearly():
    with pytest.raises(ValueError, match="unknown shapes-world task 'ocr'.*vqa, caption"):
        shapes.generate(1, 0, task="ocr")


def _expected(sample: shapes.Sample) -> str:
    """The answer worked out again from the scene, independently of the generator's own logic."""
    scene, q = sample.shapes, sample.question
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        (hit,) = [s for s in scene if s.shape == m[1]]
        return hit.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (hit,) = [s for s in scene if s.color == m[1]]
        return hit.shape
    if q == "How many shapes are there?":
        return str(len(scene))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(s.color == m[1] for s in scene))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        (hit,) = [s for s in scene if (s.color, s.shape) == (m[1], m[2])]
        row, col = divmod(hit.cell, 3)
        return "center" if hit.cell == 4 else f"{('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[col]}"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        return "yes" if any((s.color, s.shape) == (m[1], m[2]) for s in scene) else "no"
    raise AssertionError(f"unexpected question {q!r}")


def test_answers_follow_from_the_scene():
    for sample in shapes.generate(300, seed=11):
        assert sample.answer == _expected(sample), sample


def test_scene_is_what_was_drawn():
    """One shape per cell, inside its cell, painted in its colour (nearest palette colour)."""
    for sample in shapes.generate(100, seed=5, task="caption"):
        cells = [s.cell for s in sample.shapes]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 4
        for s in sample.shapes:
            row, col = divmod(s.cell, 3)
            assert col * 32 <= s.x - s.half and s.x + s.half <= (col + 1) * 32
            assert row * 32 <= s.y - s.half and s.y + s.half <= (row + 1) * 32
            pixel = sample.image.getpixel((round(s.x), round(s.y + s.half / 3)))  # inside all three shapes
            nearest = min(shapes.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(shapes.COLORS[c], pixel)))
            assert nearest == s.color
        assert sample.image.size == (96, 96) and sample.image.mode == "RGB"


def test_caption_names_every_shape_in_cell_order():
    for sample in shapes.generate(50, seed=2, task="caption"):
        assert sample.question == shapes.CAPTION_PROMPT
        parts = sample.answer.removesuffix(".").split(", ")
        assert len(parts) == len(sample.shapes)
        for part, s in zip(parts, sorted(sample.shapes, key=lambda s: s.cell)):
            assert part.endswith(f"{s.color} {s.shape} at the {s.position}")


def test_checkpoint_path_names_the_bundled_models_and_rejects_others():
    assert [checkpoint_path(n).name for n in DEMO_MODELS] == list(DEMO_MODELS)
    with pytest.raises(ValueError, match="shapes-vlm-s, shapes-vlm-l"):
        checkpoint_path("shapes-vlm-xl")


def test_conversations_ask_distinct_answerable_questions_about_one_scene():
    convs = shapes.conversations(60, seed=5, turns=4, caption_fraction=0.5)
    again = shapes.conversations(60, seed=5, turns=4, caption_fraction=0.5)
    assert [c.turns for c in convs] == [c.turns for c in again]
    assert [c.image.tobytes() for c in convs] == [c.image.tobytes() for c in again]
    assert 15 <= sum(any(k == "caption" for *_, k in c.turns) for c in convs) <= 45
    for conv in convs:
        questions = [q for q, _, kind in conv.turns if kind != "caption"]
        assert 1 <= len(questions) <= 4 and len(set(questions)) == len(questions)
        for question, answer, kind in conv.turns:
            one = shapes.Sample(conv.image, question, answer, kind, conv.shapes)
            assert answer == (shapes.caption(conv.shapes) if kind == "caption" else _expected(one))
    with pytest.raises(ValueError, match="at least one turn"):
        shapes.conversations(1, 0, turns=0)


def test_kind_weights_choose_which_questions_a_conversation_asks():
    only = shapes.conversations(20, seed=6, turns=3, caption_fraction=0.0, kind_weights=(0, 0, 1, 0, 1))
    assert {kind for c in only for *_, kind in c.turns} == {"count", "exists"}
    even = shapes.conversations(20, seed=6, turns=3, caption_fraction=0.0)
    assert [c.turns for c in even] == [c.turns for c in shapes.conversations(20, seed=6, turns=3, caption_fraction=0.0)]
    for bad in [(1, 1), (1, 1, 1, 1, -1), (0, 0, 0, 0, 0)]:
        with pytest.raises(ValueError, match="kind_weights needs 5 weights"):
            shapes.conversations(1, 0, turns=2, kind_weights=bad)
