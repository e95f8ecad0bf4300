"""Perplexity of a model's language model: on text (sliding window) and on captions given their image.

Not a generation task (those score an answer the backend produced); these score the model's
probabilities of a reference, which is how quantization error shows before it flips answers.

* `text_perplexity`: the usual sliding window (as in transformers' perplexity guide): windows of
  `max_length` tokens moved by `stride`; each token is scored once, in the window where it is
  new, with up to `max_length - stride` tokens of context before it.
* `caption_perplexity`: for a VLM, the reference caption's tokens after the chat prompt with
  its image, i.e. teacher-forced answer likelihood (the shapes world's captions have one
  canonical wording, so this is meaningful there).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter
from edgelmm.request import Request


@dataclass(frozen=True)
class Perplexity:
    """Mean negative log-likelihood per scored token (nats) and the count of scored tokens."""

    nll: float
    tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    floating = next(p for p in model.parameters() if p.is_floating_point())
    return floating.device, floating.dtype


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of `targets` [n] under `logits` [n, vocab] (float32)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


@torch.no_grad()
def text_perplexity(model: nn.Module, adapter: ModelAdapter, text: str, max_length: int = 512, stride: int = 256) -> Perplexity:
    """Sliding-window perplexity of `text` under the language model (text only, no images)."""
    if not 0 < stride <= max_length:
        raise EdgelmmError(f"perplexity stride must be in 1..max_length ({max_length}), got {stride}")
    device, _ = _device_and_dtype(model)
    ids = adapter.tokenizer(text, return_tensors="pt")["input_ids"][0].to(device)
    if ids.numel() < 2:
        raise EdgelmmError("perplexity text has fewer than two tokens", "give a longer text")
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end]
        logits = model(input_ids=window[None]).logits[0, :-1]
        new = end - scored_to  # predictions for positions scored_to .. end-1
        total += float(_nll(logits[-new:], window[-new:]))
        count += new
        scored_to = end
        if end == ids.numel():
            break
    return Perplexity(total / count, count)


def read_text(path: str | Path, text_field: str = "text") -> str:
    """A .txt file whole, or the `text_field` of every line of a .jsonl file, joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise EdgelmmError(f"perplexity text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                texts.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EdgelmmError(f"{path}:{number}: expected a JSON object with a '{text_field}' string") from None
    return "\n\n".join(texts)


@torch.no_grad()
def caption_perplexity(model: nn.Module, adapter: ModelAdapter, samples: Sequence[tuple[str, list[Any], str]]) -> Perplexity:
    """Perplexity of each reference answer after its (prompt, images), over all answer tokens."""
    device, dtype = _device_and_dtype(model)
    total, count = 0.0, 0
    for prompt, images, reference in samples:
        target = adapter.tokenizer(reference, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        inputs = adapter.append_tokens(adapter.build_inputs(Request.chat(prompt, images)), target)
        inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        logits = model(**inputs).logits[0, -target.numel() - 1 : -1]
        total += float(_nll(logits, target.to(device)))
        count += target.numel()
    if not count:
        raise EdgelmmError("no caption tokens to score")
    return Perplexity(total / count, count)
