"""File-based tasks: your own data as JSONL, one sample per line.

    vqa-jsonl  {"image": "imgs/1.png", "question": "What color is the car?", "answer": "red"}
    mc-jsonl   {"image": "imgs/2.png", "question": "...", "options": ["cat", "dog"], "answer": "B"}

Image paths are relative to the JSONL file's folder, so a data folder can be moved whole;
`image` may be left out for text-only questions, and `category` (optional) groups the
accuracy by kind. The whole file is parsed and every image path checked when the task is
built, so a bad line stops the run before any model loads; images are decoded only for the
samples asked for. `samples(n)` takes the first `n` lines in file order (the seed is not used),
like lm-evaluation-harness's `--limit`, so smaller runs are prefixes of larger ones.
"""

from __future__ import annotations

import string
from abc import abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from edgelmm.errors import EdgelmmError
from edgelmm.tasks.base import Task, TaskSample
from edgelmm.tasks.scoring import choice_accuracy, exact_match
from edgelmm.utils.io import read_jsonl_records

MAX_IMAGE_PIXELS = 8192 * 8192  # per task image; PIL itself refuses twice its own 89 M-pixel warning level
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA's MMBench prompt


class _JsonlTask(Task):
    """Reads, checks and holds the lines; subclasses turn one record into a sample."""

    needs_path = True

    def __init__(self, path: str | Path | None = None):
        super().__init__(path)
        self._rows = [(number, self._sample(number, record)) for number, record in self._records()]
        if not self._rows:
            raise EdgelmmError(f"{self.path}: no samples", "write one JSON object per line")

    def _records(self) -> list[tuple[int, dict[str, Any]]]:
        assert self.path is not None
        if not self.path.is_file():
            raise EdgelmmError(f"task file not found: {self.path}", "check the task's 'path'")
        return read_jsonl_records(self.path)

    def _fail(self, number: int, problem: str, hint: str | None = None) -> EdgelmmError:
        return EdgelmmError(f"{self.path}:{number}: {problem}", hint)

    def _text(self, number: int, record: dict[str, Any], key: str) -> str:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise self._fail(number, f"'{key}' must be a non-empty string (got {value!r})")
        return value

    def _image_path(self, number: int, record: dict[str, Any]) -> Path | None:
        value = record.get("image")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail(number, f"'image' must be a path string (got {value!r})")
        assert self.path is not None
        image = self.path.parent / value
        if not image.is_file():
            raise self._fail(number, f"image not found: {image}", "image paths are relative to the JSONL file's folder")
        return image

    def _base(self, number: int, record: dict[str, Any], prompt: str, reference: str) -> TaskSample:
        kind = record.get("category")
        image = self._image_path(number, record)
        return TaskSample(
            id=str(record.get("id", number)), prompt=prompt, reference=reference,
            kind=str(kind) if kind is not None else None,
            meta={"line": number, "image": str(image) if image else None},
        )

    @abstractmethod
    def _sample(self, number: int, record: dict[str, Any]) -> TaskSample: ...

    def samples(self, n: int, seed: int = 0) -> list[TaskSample]:
        return [
            replace(sample, images=[self._decode(number, sample.meta["image"])] if sample.meta["image"] else [])
            for number, sample in self._rows[:n]
        ]

    def _decode(self, number: int, image: str) -> Image.Image:
        try:
            with Image.open(image) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:  # checked before the pixels are allocated
                    raise self._fail(number, f"image {image} is {width}x{height} pixels, more than the "
                                     f"{MAX_IMAGE_PIXELS:,} a task image may have", "downscale it (VLM processors "
                                     "resize far below this anyway)")
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
            raise self._fail(number, f"cannot read image {image}: {exc}", "replace or remove the corrupt image") from None


class VqaJsonl(_JsonlTask):
    """Open questions, scored by exact match after normalisation; the question is the prompt."""

    name = "vqa-jsonl"

    def _sample(self, number: int, record: dict[str, Any]) -> TaskSample:
        return self._base(number, record, self._text(number, record, "question"), self._text(number, record, "answer"))

    def score(self, output: str, sample: TaskSample) -> float:
        return exact_match(output, sample.reference)


class McJsonl(_JsonlTask):
    """Multiple choice (MMLU / MMStar style): the prompt lists lettered options and asks for the
    letter; the score is whether the first option letter in the output is the answer."""

    name = "mc-jsonl"

    def _options(self, number: int, record: dict[str, Any]) -> dict[str, str]:
        options = record.get("options")
        if isinstance(options, list) and 2 <= len(options) <= 26:
            return {string.ascii_uppercase[i]: str(o) for i, o in enumerate(options)}
        if isinstance(options, dict) and len(options) >= 2 and all(
            isinstance(k, str) and len(k) == 1 and k.upper() in string.ascii_uppercase for k in options
        ):
            return {k.upper(): str(options[k]) for k in sorted(options, key=str.upper)}
        raise self._fail(
            number, f"'options' must be a list of 2-26 choices or a dict keyed by letters A.. (got {options!r})"
        )

    def _sample(self, number: int, record: dict[str, Any]) -> TaskSample:
        options = self._options(number, record)
        answer = self._text(number, record, "answer").strip().upper()
        if answer not in options:
            raise self._fail(number, f"answer '{answer}' is not one of the option letters {', '.join(options)}")
        listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
        prompt = f"{self._text(number, record, 'question')}\n{listed}\n{MC_INSTRUCTION}"
        sample = self._base(number, record, prompt, answer)
        sample.meta["letters"] = "".join(options)
        return sample

    def score(self, output: str, sample: TaskSample) -> float:
        return choice_accuracy(output, sample.reference, sample.meta["letters"])
