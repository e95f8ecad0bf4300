"""The shapes world as named AWQ calibration sources (`edgelmm.registry.CALIBRATION_SOURCES`).

Both draw from training seeds, so calibration never sees an evaluation picture:

- "shapes": an endless stream of captions, as plain text;
- "shapes-images": what a demo VLM's language model reads in deployment: questions and caption
  requests with their pictures, through the model's own processor and chat template, the
  reference answer appended, so image tokens are among the activations AWQ scales for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from edgelmm.demo import shapes
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request


def caption_texts(config: Any, adapter: Any = None) -> Iterator[str]:
    for stream in itertools.count(shapes.TRAIN_SEED_BASE + 7_000_000 + config.seed * 100_000):
        yield from (sample.answer for sample in shapes.generate(64, stream, task="caption"))


def image_batches(config: Any, adapter: Any) -> list[Any]:
    """`num_samples` conversations (half questions, half captions), one per batch; nothing is
    truncated, since cutting into an image's tokens would break the model's input."""
    from edgelmm.methods.quantization.calibration import prompt_batch

    if adapter is None or not adapter.multimodal:
        raise EdgelmmError("'shapes-images' calibration needs a vision-language model", "use 'shapes' (captions as text)")
    seed = shapes.TRAIN_SEED_BASE + 8_000_000 + config.seed * 100_000
    half = config.num_samples // 2
    samples = shapes.generate(config.num_samples - half, seed, task="vqa") + shapes.generate(half, seed + 1, task="caption")
    return [prompt_batch(adapter, Request.chat(s.question, [s.image]), s.answer) for s in samples]
