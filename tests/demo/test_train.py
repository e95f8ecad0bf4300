"""The training-side encoding agrees with the processor and chat template a user runs, and training
steps learn in both precisions, and a saved checkpoint is readable as any new file is."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from edgelmm.demo import shapes
from edgelmm.demo.tokenizer import build_tokenizer
from edgelmm.demo.train import (
    AUX_CLASSES,
    IMAGE_TOKENS,
    Preset,
    _normalise,
    aux_labels,
    bf16_autocast_fast,
    build_model,
    build_processor,
    encode,
    save,
    train,
)


def _chat(conv: shapes.Conversation) -> list[dict]:
    messages = []
    for i, (question, answer, _) in enumerate(conv.turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


@pytest.mark.parametrize(("image_size", "patch"), [(96, 8), (24, 8), (12, 4)])
def test_multi_turn_encoding_is_the_chat_template_with_labels_on_answers_only(image_size, patch):
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_size, patch)
    convs = shapes.conversations(4, seed=3, turns=3, caption_fraction=1.0)
    batch = encode(convs, tokenizer, image_size, patch)
    assert batch["pixels"].shape[-2:] == (image_size, image_size)
    assert batch["aux"].shape[1] == (image_size // patch) ** 2
    for row, conv in enumerate(convs):
        text = processor.apply_chat_template(_chat(conv)).removesuffix("\n")  # the template's last glue
        expected = processor(images=[conv.image], text=[text], return_tensors="pt")
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids.tolist() == expected["input_ids"][0].tolist()
        # the picture the vision tower sees in training is the one the processor gives a user
        assert torch.allclose(_normalise(batch["pixels"][row : row + 1], torch.float32), expected["pixel_values"], atol=1e-5)
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        answers = [t for _, answer, _ in conv.turns
                   for t in tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
        assert labelled.tolist() == answers


def test_perception_labels_mark_each_shape_cell_and_nothing_else():
    scene = shapes.generate(1, seed=4)[0].shapes
    labels = aux_labels([scene])[0].view(12, 12, 4)
    assert labels.shape[-1] == len(AUX_CLASSES) and IMAGE_TOKENS == 144
    for cell in range(9):
        block = labels[(cell // 3) * 4 : (cell // 3) * 4 + 4, (cell % 3) * 4 : (cell % 3) * 4 + 4]
        hit = [s for s in scene if s.cell == cell]
        color = list(shapes.COLORS).index(hit[0].color) + 1 if hit else 0
        shape = list(shapes.SHAPES).index(hit[0].shape) + 1 if hit else 0
        assert torch.all(block[..., 0] == color) and torch.all(block[..., 1] == shape)
        assert torch.all(block[..., 2] == cell // 3) and torch.all(block[..., 3] == cell % 3)


def test_perception_labels_at_one_patch_per_cell_and_a_grid_that_does_not_split():
    scene = shapes.generate(1, seed=4)[0].shapes
    labels = aux_labels([scene], side=3)[0]
    assert labels[:, 2].tolist() == [c // 3 for c in range(9)] and labels[:, 3].tolist() == [c % 3 for c in range(9)]
    assert [int(c) for c in labels[:, 0].nonzero().flatten()] == [s.cell for s in scene]
    with pytest.raises(ValueError, match="4 patches a side"):
        aux_labels([scene], side=4)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_few_training_steps_lower_the_loss_in_fp32_and_bf16_autocast(bf16):
    """(the fp32 run at a 24-px picture side, the bf16 one at the full 96 px)"""
    tokenizer = build_tokenizer()
    preset = Preset(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
                    steps=12, lr=3e-3, batch_size=4, warmup=2, turns=2, image_size=96 if bf16 else 24)
    torch.manual_seed(0)
    model = build_model(preset, tokenizer)
    steps, history = train(model, tokenizer, preset, seed=0, device="cpu", steps=preset.steps, bf16=bf16)
    assert steps == 12 and [h["step"] for h in history] == [0]
    first = history[0]["loss"]
    model.eval()
    batch = encode(shapes.conversations(4, shapes.TRAIN_SEED_BASE, preset.turns), tokenizer, preset.image_size)
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      pixel_values=_normalise(batch["pixels"], torch.float32)).loss.item()
    assert math.isfinite(after) and after < first
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32


def test_bf16_autocast_is_chosen_on_cuda_and_only_where_the_cpu_has_bf16_instructions():
    assert bf16_autocast_fast("cuda") is True
    assert bf16_autocast_fast("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_saved_checkpoint_has_the_modes_the_users_umask_gives(tmp_path):
    tokenizer = build_tokenizer()
    preset = Preset(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2,
                    steps=1, lr=1e-3, image_size=24)
    old = os.umask(0o002)
    try:
        save(build_model(preset, tokenizer), build_processor(tokenizer, 24), tmp_path / "ckpt", {"name": "t"})
    finally:
        os.umask(old)
    items = [tmp_path / "ckpt", *(tmp_path / "ckpt").iterdir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in items if p.is_file()} == {0o664}
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o775
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and not list(tmp_path.glob(".ckpt*"))
