"""LLaVA checkpoints edgelmm writes carry the weight names vLLM's loader reads.

vLLM (vllm/model_executor/models/llava.py, `LlavaForConditionalGeneration.hf_to_vllm_mapper`)
maps a checkpoint's `model.language_model.` / `model.vision_tower.` /
`model.multi_modal_projector.` / `lm_head.` prefixes onto its own modules and leaves the
llava-hf spellings (`language_model.model.`, `vision_tower.`, ...) as they are; its vision tower
is its own CLIPVisionModel (vllm/model_executor/models/clip.py), whose parameters all sit under
`vision_model` (`self.vision_model = CLIPVisionTransformer(...)`). So every tower weight must be
`vision_tower.vision_model.*`, which transformers 5 does not write for a tower built from a config.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edgelmm.cli import main
from edgelmm.demo import DEMO_MODELS, checkpoint_path
from edgelmm.models.llava import LlavaAdapter
from tests.tiny_models import save_tiny

VLLM_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                 "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}
VLLM_MODULES = ("vision_tower.vision_model.embeddings.", "vision_tower.vision_model.pre_layrnorm.",
                "vision_tower.vision_model.encoder.layers.", "vision_tower.vision_model.post_layernorm.",
                "language_model.model.", "language_model.lm_head.", "multi_modal_projector.")


def vllm_name(key: str) -> str:
    for old, new in VLLM_PREFIXES.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def unplaced(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return [k for k in handle.keys() if not vllm_name(k).startswith(VLLM_MODULES)]


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_shipped_demo_checkpoints(name):
    assert unplaced(checkpoint_path(name)) == []


def test_quantized_and_converted_checkpoints(tmp_path, capsys):
    assert main(["quantize", "shapes-vlm-s", "--method", "rtn", "--out", str(tmp_path / "q")]) == 0
    assert main(["convert", str(tmp_path / "q"), "--out", str(tmp_path / "awq")]) == 0
    assert unplaced(tmp_path / "q") == [] and unplaced(tmp_path / "awq") == []


def test_a_tower_built_from_a_config_is_renamed_and_still_loads(tmp_path):
    """What transformers 5 writes for a new model, renamed in place; transformers reads both spellings."""
    from transformers import AutoModelForImageTextToText

    path = save_tiny("llava", tmp_path / "m")
    assert unplaced(path)  # transformers' own spelling: vision_tower.embeddings...
    before = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    LlavaAdapter.finish_checkpoint(path, json.loads((path / "config.json").read_text()))
    assert unplaced(path) == []
    after = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
