"""A pruning method defined outside the package plugs in by name, and pruning composes with
weight quantization in either order."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from edgelmm.methods import apply
from edgelmm.methods.pruning import Pruner, VisualTokens, pruning_of, unprune
from edgelmm.registry import METHODS
from edgelmm.request import Request
from tests.tiny_models import sample_images


@pytest.fixture
def norm_method():
    """The docs' worked example: keep the visual tokens whose hidden states have the largest norm."""

    @dataclass(kw_only=True)
    class Norm(Pruner):
        name: ClassVar[str] = "norm"

        def score(self, visual: VisualTokens) -> torch.Tensor:
            return visual.hidden.norm(dim=-1)

    METHODS.register("norm", Norm)
    yield Norm
    METHODS._entries.pop("norm")


def test_a_new_method_is_one_class_and_runs_by_spec(tiny, norm_method):
    model, _, adapter = tiny("qwen2_vl")
    inputs = adapter.build_batch([Request.chat("What color is the circle?", [sample_images("qwen2_vl")[1]])])
    seen = []  # layer 1's input without pruning: what the method will score
    hook = adapter.language_layers()[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.inference_mode():
        model(**inputs)
    hook.remove()
    apply(model, adapter, "norm(k=1, keep=0.25)")
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=adapter.tokenizer.pad_token_id)
        stats = pruning_of(model).last
    finally:
        unprune(model)
    image = adapter.image_token_mask(inputs["input_ids"])[0]
    expected = image.nonzero()[:, 0][seen[0][0, image].norm(dim=-1).topk(2).indices].sort().values
    kept = stats.kept_positions[0]
    assert stats.kept_visual == [2] and kept[image[kept]].tolist() == expected.tolist()


@pytest.mark.parametrize("order", [("fastv(k=1, keep=0.5)", "rtn(bits=4, group_size=32)"),
                                   ("rtn(bits=4, group_size=32)", "fastv(k=1, keep=0.5)")])
def test_pruning_composes_with_weight_quantization(order):
    from edgelmm.methods.quantization import QuantLinear
    from edgelmm.models.registry import get_adapter
    from tests.tiny_models import make_tiny

    model, processor = make_tiny("qwen2_vl")
    adapter = get_adapter(model, processor)
    for spec in order:
        model = apply(model, adapter, spec)
    inputs = adapter.build_batch([Request.chat("What color is the circle?", [sample_images("qwen2_vl")[1]])])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=adapter.tokenizer.pad_token_id)
    assert isinstance(adapter.attention(0).q_proj, QuantLinear)
    assert pruning_of(model).last.kept_visual == [4] and out.shape[1] == inputs["input_ids"].shape[1] + 3
