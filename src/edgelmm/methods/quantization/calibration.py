"""Calibration data: text from a source, tokenized and cut into the batches AWQ runs.

Sources (see `CalibrationConfig.source`): a local .txt file (one text per paragraph) or .jsonl
file (one object per line, text under `text_field`), a folder written by
`datasets.save_to_disk`, `hf:NAME[:SPLIT]`, a Hugging Face dataset found in the local cache with
`local_files_only=True` (nothing is ever downloaded), or a named source registered in
`edgelmm.registry.CALIBRATION_SOURCES`: a function of (config, adapter) that returns texts or
ready `CalibrationBatch`es (the bundled demo registers "shapes" and "shapes-images", its world's
captions and its VLM chats with pictures).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgelmm.errors import EdgelmmError, MissingExtraError
from edgelmm.methods.quantization.config import CalibrationConfig
from edgelmm.models.base import ModelAdapter
from edgelmm.registry import CALIBRATION_SOURCES
from edgelmm.utils.io import read_jsonl_records


@dataclass
class CalibrationBatch:
    """Token ids [batch, seq], the mask of real (non-padding) tokens, and the processor's other
    model inputs (pixel values, image grids) for image samples."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


# ---------------------------------------------------------------- sources


def _file_texts(path: Path, text_field: str) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgelmmError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix != ".jsonl":
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    texts = []
    for number, record in read_jsonl_records(path):
        if not isinstance(record.get(text_field), str):
            raise EdgelmmError(f"{path}:{number}: no string field '{text_field}'", "set the text field with --text-field")
        texts.append(record[text_field])
    return texts


def _dataset_texts(source: str, text_field: str) -> list[str]:
    """Texts of a Hugging Face dataset on disk: a save_to_disk folder or a cached hub dataset."""
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("calibration from a Hugging Face dataset", "quant", "datasets") from None
    if source.startswith("hf:"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        name, _, split = source[3:].partition(":")
        try:
            local = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise EdgelmmError(
                f"Hugging Face dataset '{name}' is not in the local cache", "download it first; edgelmm never downloads"
            ) from None
        data = datasets.load_dataset(local, split=split or "train")
    else:
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
    if text_field not in data.column_names:
        raise EdgelmmError(f"dataset {source} has no column '{text_field}'", f"columns: {', '.join(data.column_names)}")
    return [t for t in data[text_field] if isinstance(t, str) and t.strip()]


def _named(config: CalibrationConfig, adapter: ModelAdapter | None) -> Iterator[str] | list[CalibrationBatch]:
    return CALIBRATION_SOURCES.get(config.source)(config, adapter)


def calibration_texts(config: CalibrationConfig, adapter: ModelAdapter | None = None) -> Iterator[str]:
    """The source's texts; finite sources are shuffled with the config's seed, as AutoAWQ does."""
    source = config.source
    if source in CALIBRATION_SOURCES:
        texts = _named(config, adapter)
        if isinstance(texts, list) and texts and isinstance(texts[0], CalibrationBatch):
            raise EdgelmmError(f"calibration source '{source}' gives model inputs, not text")
        return iter(texts)
    path = Path(source).expanduser()
    if source.startswith("hf:"):
        texts = _dataset_texts(source, config.text_field)
    elif path.is_dir():
        texts = _dataset_texts(str(path), config.text_field)
    elif path.is_file():
        texts = _file_texts(path, config.text_field)
    else:
        raise EdgelmmError(
            f"calibration source not found: {source}",
            f"use a .txt / .jsonl file, a datasets folder, hf:NAME[:SPLIT] of a cached dataset, "
            f"or one of {', '.join(CALIBRATION_SOURCES.names())}",
        )
    random.Random(config.seed).shuffle(texts)
    return iter(texts)


# ---------------------------------------------------------------- tokenization


def calibration_batches(tokenizer: Any, config: CalibrationConfig, adapter: ModelAdapter | None = None) -> list[CalibrationBatch]:
    """Tokenize the source's texts into batches of `config.batch_size` samples.

    Raises a clear error when the source yields no token at all (an empty file, say).
    """
    eos = tokenizer.eos_token_id
    texts = calibration_texts(config, adapter)
    if config.concat:
        samples = _blocks(tokenizer, texts, config, eos)
    else:
        samples = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: config.max_seq_len]
            if ids:
                samples.append(ids)
            if len(samples) == config.num_samples:
                break
    if not samples:
        raise EdgelmmError(f"the calibration set is empty: {config.source} yields no text", "give a source with text in it")
    if not config.concat and not config.padding:  # ragged: one sample per batch
        return [_batch([ids], len(ids), tokenizer) for ids in samples]
    chunks = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    return [_batch(chunk, max(map(len, chunk)), tokenizer) for chunk in chunks]


def _blocks(tokenizer: Any, texts: Iterator[str], config: CalibrationConfig, eos: int | None) -> list[list[int]]:
    """Texts joined (with EOS between them) and cut into blocks of exactly max_seq_len tokens;
    a source too short for one whole block gives one shorter block rather than nothing."""
    need = config.num_samples * config.max_seq_len
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    n = config.max_seq_len
    blocks = [stream[i : i + n] for i in range(0, min(len(stream), need) - n + 1, n)]
    return blocks or ([stream] if stream else [])


def _batch(samples: list[list[int]], length: int, tokenizer: Any) -> CalibrationBatch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(samples), length), pad, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):  # right padding: causal attention never sees it
        ids[row, : len(sample)] = torch.tensor(sample)
        mask[row, : len(sample)] = 1
    return CalibrationBatch(ids, mask)


def calibration_data(adapter: ModelAdapter, config: CalibrationConfig) -> list[CalibrationBatch]:
    """The batches for `config.source`: a named source's own batches, or text through the tokenizer."""
    if config.source in CALIBRATION_SOURCES:
        batches = _named(config, adapter)
        if isinstance(batches, list) and batches and isinstance(batches[0], CalibrationBatch):
            return batches
    return calibration_batches(adapter.tokenizer, config, adapter)


def prompt_batch(adapter: ModelAdapter, request: Any, answer: str) -> CalibrationBatch:
    """One calibration sample from a request and its reference answer: the model's own inputs
    (chat template, image tokens, pixel values) with the answer and EOS appended."""
    eos = [adapter.tokenizer.eos_token_id] if adapter.tokenizer.eos_token_id is not None else []
    ids = torch.tensor(adapter.tokenizer(answer, add_special_tokens=False)["input_ids"] + eos)
    inputs = adapter.append_tokens(adapter.build_inputs(request), ids)
    input_ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    return CalibrationBatch(input_ids, mask, inputs)
