"""The training-side encoding agrees with the processor and chat template a user runs, and training
steps learn in both precisions."""

from __future__ import annotations

import math

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
    train,
)


def _chat(conv: shapes.Conversation) -> list[dict]:
    messages = []
    for i, (question, answer, _) in enumerate(conv.turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def test_multi_turn_encoding_is_the_chat_template_with_labels_on_answers_only():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    convs = shapes.conversations(4, seed=3, turns=3, caption_fraction=1.0)
    batch = encode(convs, tokenizer)
    for row, conv in enumerate(convs):
        text = processor.apply_chat_template(_chat(conv)).removesuffix("\n")  # the template's last glue
        expected = processor(images=[conv.image], text=[text], return_tensors="pt")["input_ids"][0]
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids.tolist() == expected.tolist()
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


@pytest.mark.parametrize("bf16", [False, True])
def test_a_few_training_steps_lower_the_loss_in_fp32_and_bf16_autocast(bf16):
    tokenizer = build_tokenizer()
    preset = Preset(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
                    steps=12, lr=3e-3, batch_size=4, warmup=2, turns=2)
    torch.manual_seed(0)
    model = build_model(preset, tokenizer)
    steps, history = train(model, tokenizer, preset, seed=0, device="cpu", steps=preset.steps, bf16=bf16)
    assert steps == 12 and [h["step"] for h in history] == [0]
    first = history[0]["loss"]
    model.eval()
    batch = encode(shapes.conversations(4, shapes.TRAIN_SEED_BASE, preset.turns), tokenizer)
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      pixel_values=_normalise(batch["pixels"], torch.float32)).loss.item()
    assert math.isfinite(after) and after < first
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32


def test_bf16_autocast_is_chosen_on_cuda_and_only_where_the_cpu_has_bf16_instructions():
    assert bf16_autocast_fast("cuda") is True
    assert bf16_autocast_fast("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
