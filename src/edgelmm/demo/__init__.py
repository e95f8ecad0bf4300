"""The bundled demo: a synthetic shapes world and five tiny LLaVA models trained on it.

The checkpoints are plain Hugging Face folders (LlavaForConditionalGeneration + LlavaProcessor),
so that everything in edgelmm — backends, pruning, quantization, serving — can
be run and scored end to end without downloading anything. `shapes-vlm-s` plays the edge
model, `shapes-vlm-l` the several-times-larger cloud model. Three weaker ones serve the edge-cloud
demo: `shapes-vlm-thumb-1l` and `shapes-vlm-thumb` look at a 24-px thumbnail and are unsure where
they fail (the routing pairs' edges, 85 % and 89 % of the cloud's accuracy), `shapes-vlm-xs` is
under-trained (the drafter of the draft-verify figures).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS = ("shapes-vlm-s", "shapes-vlm-l", "shapes-vlm-xs", "shapes-vlm-thumb", "shapes-vlm-thumb-1l")
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """Folder of a bundled demo checkpoint, loadable with `from_pretrained`."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}: the bundled demo models are {', '.join(DEMO_MODELS)}")
    return CHECKPOINTS / name
