"""The demo model's exact architecture and tokenizer with random weights, for tests that must not
wait for (or depend on) the trained checkpoints: `shapes-vlm-s`'s LLaVA config, CLIP tower, Llama
language model and the shapes-world byte-level BPE, saved as an HF checkpoint in a few seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from edgelmm.demo import checkpoint_path


def save_demo_like(path: Path, preset: str = "shapes-vlm-s", seed: int = 0) -> Path:
    from edgelmm.demo.tokenizer import build_tokenizer
    from edgelmm.demo.train import PRESETS, build_model, build_processor

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    build_model(PRESETS[preset], tokenizer).save_pretrained(path)
    build_processor(tokenizer).save_pretrained(path)
    return path


def trained_demo(name: str = "shapes-vlm-s") -> Path | None:
    """The bundled trained checkpoint, if this tree has it."""
    path = checkpoint_path(name)
    return path if (path / "config.json").is_file() else None
