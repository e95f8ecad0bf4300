"""The bundled demo: a synthetic shapes world and three tiny LLaVA models trained on it.

The checkpoints are plain Hugging Face folders (LlavaForConditionalGeneration + LlavaProcessor),
so that everything in edgelmm — backends, pruning, quantization, serving — can
be run and scored end to end without downloading anything. `shapes-vlm-s` plays the edge
model, `shapes-vlm-l` the several-times-larger cloud model; `shapes-vlm-xs`, weak on purpose, is
the edge of the edge-cloud demo, where routing has wrong answers to fix.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS = ("shapes-vlm-s", "shapes-vlm-l", "shapes-vlm-xs")
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """Folder of a bundled demo checkpoint, loadable with `from_pretrained`."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}: the bundled demo models are {', '.join(DEMO_MODELS)}")
    return CHECKPOINTS / name
