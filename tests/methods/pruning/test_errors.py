"""Bad input gets one clear error; a request without an image is a documented no-op."""

import pytest
import torch

from edgelmm.errors import EdgelmmError
from edgelmm.methods import apply
from edgelmm.methods.pruning import FastV, Uniform, VisionZip, prune, pruning_of
from edgelmm.request import Request
from tests.methods.pruning.conftest import pruned
from tests.tiny_models import sample_images


@pytest.mark.parametrize("keep", [0, 0.0, -0.25, 1.5, "half", True])
def test_keep_must_be_a_share_in_zero_one(keep):
    with pytest.raises(EdgelmmError, match=r"keep must be a share of the visual tokens in \(0, 1\]"):
        FastV(keep=keep)


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": 0}, "tokens must be a whole number"),
    ({"tokens": 2.5}, "tokens must be a whole number"),
    ({"keep": 0.5, "tokens": 8}, "both given"),
    ({"k": -1}, "k must be a decoder-layer index"),
])
def test_counts_and_layers_are_checked(kwargs, message):
    with pytest.raises(EdgelmmError, match=message):
        FastV(**kwargs)


def test_layer_beyond_the_model_or_before_any_attention(tiny):
    model, _, adapter = tiny("llava")  # 2 decoder layers
    with pytest.raises(EdgelmmError, match=r"k=2 is beyond the model's 2 decoder layers.*choose k between 1 and 1"):
        prune(model, adapter, FastV(k=2))
    with pytest.raises(EdgelmmError, match="k must be >= 1: tokens are ranked by the attention of decoder layer k-1"):
        prune(model, adapter, FastV(k=0))
    with pytest.raises(EdgelmmError, match="k=7 is beyond"):
        prune(model, adapter, Uniform(k=7))
    assert pruning_of(model) is None and not model._forward_pre_hooks  # nothing half-attached


def test_text_only_model(tiny):
    model, _, adapter = tiny("qwen2")
    with pytest.raises(EdgelmmError, match="text-only language model: it has no visual tokens to prune"):
        prune(model, adapter, FastV(k=1))


def test_method_specs_reach_the_same_checks(tiny):
    model, _, adapter = tiny("llava")
    with pytest.raises(EdgelmmError, match="keep must be"):
        apply(model, adapter, "fastv(k=1, keep=2)")
    with pytest.raises(EdgelmmError, match="method 'fastv': unknown setting.*ratio.*known: k, keep, tokens"):
        apply(model, adapter, "fastv(ratio=0.5)")
    with pytest.raises(EdgelmmError, match="unknown method 'fastvv'.*did you mean 'fastv'.*available: awq, divprune, fastv"):
        apply(model, adapter, "fastvv")


def test_one_pruning_at_a_time(tiny):
    model, _, adapter = tiny("llava")
    with pruned(model, adapter, Uniform(keep=0.5)):
        with pytest.raises(EdgelmmError, match=r"already pruned by uniform\(keep=0.5\).*unprune"):
            prune(model, adapter, FastV(k=1))


def test_cls_scoring_needs_a_cls_token(tiny):
    model, _, adapter = tiny("qwen2_vl")
    with pytest.raises(EdgelmmError, match="by='cls', but the qwen2_vl vision encoder has no \\[CLS\\] token"):
        prune(model, adapter, VisionZip(by="cls"))
    assert pruning_of(model) is None and not model._forward_pre_hooks  # nothing half-attached


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_request_without_an_image_is_left_alone(tiny, family):
    model, _, adapter = tiny(family)
    inputs = adapter.build_batch([Request.chat("Hello! How can I help you today?", [])])
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=adapter.tokenizer.pad_token_id)
    with torch.inference_mode():
        reference = model.generate(**inputs, **kwargs)
        with pruned(model, adapter, FastV(k=1, keep=0.25)):
            out = model.generate(**inputs, **kwargs)
            assert pruning_of(model).last is None
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))


def test_caches_other_than_dynamic_are_refused(tiny):
    model, _, adapter = tiny("llava")
    inputs = adapter.build_batch([Request.chat("What color is the circle?", [sample_images("llava")[0]])])
    with pruned(model, adapter, Uniform(keep=0.5)), pytest.raises(EdgelmmError, match="works on transformers' DynamicCache only"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static", pad_token_id=adapter.tokenizer.pad_token_id)
