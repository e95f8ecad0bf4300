"""The training-side encoding agrees with the processor and chat template a user runs."""

from __future__ import annotations

import torch

from edgelmm.demo import shapes
from edgelmm.demo.tokenizer import build_tokenizer
from edgelmm.demo.train import AUX_CLASSES, IMAGE_TOKENS, aux_labels, build_processor, encode


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
