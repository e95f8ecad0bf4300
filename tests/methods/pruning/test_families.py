"""Every pruning method on a tiny random-weight model of every family, through `generate`.

What must hold: keep=1.0 is bit-identical to the unpruned model; the sequence and every layer's
KV cache shrink to the kept tokens; the tokens that stay keep their positions (M-RoPE's 3-D ones
included), so that pruning before the language model equals running the language model itself
on the kept embeddings at their original positions, at prefill and at every decode step; and a
batch (left padding, rows with different numbers of visual tokens) gives each row what it gets
alone.
"""

import pytest
import torch

from edgelmm.methods.pruning import DivPrune, FastV, RandomTokens, Uniform, VisionZip, pruning_of
from edgelmm.request import Request
from tests.methods.pruning.conftest import pruned
from tests.tiny_models import VLM_FAMILIES, sample_images

STEPS = 4
METHODS = {
    "fastv": lambda keep: FastV(k=1, keep=keep),
    "random": lambda keep: RandomTokens(keep=keep),
    "uniform": lambda keep: Uniform(keep=keep),
    "visionzip": lambda keep: VisionZip(keep=keep),
    "divprune": lambda keep: DivPrune(keep=keep),
    "divprune-merge": lambda keep: DivPrune(k=1, keep=keep, merge=True),  # proportional attention
}


def batch(adapter, family, sizes=(0, 0)):
    """Two prompts of different lengths (left padding), with sample_images(family)[size] each."""
    images = sample_images(family)
    prompts = ("What color is the circle?", "How many squares?")
    return adapter.build_batch([Request.chat(p, [images[s]]) for p, s in zip(prompts, sizes)])


def generate(model, adapter, inputs):
    """Greedy, exactly STEPS new tokens, with the raw logits and the cache."""
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=adapter.tokenizer.pad_token_id,
        )


def cache_lengths(out):
    cache = getattr(out, "cache", None) or out.past_key_values
    return {layer.keys.shape[-2] for layer in cache.layers}


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_fewer_tokens_shrink_sequence_and_cache(tiny, family, method):
    model, _, adapter = tiny(family)
    inputs = batch(adapter, family)
    reference = generate(model, adapter, inputs)
    visual = adapter.image_token_mask(inputs["input_ids"]).sum(1).tolist()
    for keep in (1.0, 0.5):
        with pruned(model, adapter, METHODS[method](keep)):
            out = generate(model, adapter, inputs)
            stats = pruning_of(model).last
        if keep == 1.0:
            assert torch.equal(out.sequences, reference.sequences)
            assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
        expected = [max(1, int(n * keep + 0.5)) for n in visual]
        assert stats.visual_tokens == visual and stats.kept_visual == expected
        assert stats.kept_tokens == inputs["input_ids"].shape[1] - (visual[0] - expected[0])
        assert cache_lengths(out) == {stats.kept_tokens + STEPS - 1}  # every layer, prompt and decode


def language_model_inputs(model, adapter, inputs):
    """The arguments the model hands its language model at prefill: embeddings with the image
    features in, position ids as the family computes them, and any per-token extras."""
    seen = {}
    hook = adapter.language_model().register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.inference_mode():
        model(**inputs)
    hook.remove()
    return seen


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_pruning_before_the_language_model_equals_the_language_model_on_the_kept_tokens(tiny, family):
    """Reference: the unpruned language model run by hand on the kept embeddings at their original
    positions (and deepstack features of the kept tokens), decoding the same tokens."""
    model, _, adapter = tiny(family)
    inputs = batch(adapter, family)
    with pruned(model, adapter, Uniform(keep=0.5)):
        out = generate(model, adapter, inputs)
        keep = pruning_of(model).last.kept_positions

    seen = language_model_inputs(model, adapter, inputs)
    embeds = seen["inputs_embeds"]
    rows, length = embeds.shape[:2]
    image = adapter.image_token_mask(inputs["input_ids"])
    kept_visual = image.gather(1, keep)[image.gather(1, keep)].numel()
    visual_rows = torch.zeros_like(image).scatter(1, keep, True)[image]  # kept ones, batch order
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(length).expand(rows, length)
    args = {"position_ids": positions.gather(-1, keep.expand(*positions.shape[:-1], -1)),
            "attention_mask": inputs["attention_mask"].gather(1, keep),
            "inputs_embeds": embeds.gather(1, keep[..., None].expand(-1, -1, embeds.shape[-1]))}
    for name, value in seen.items():  # per-token extras the family passes (Qwen3-VL deepstack)
        if isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length) and name not in args:
            args[name] = value.gather(1, keep)
        elif isinstance(value, list) and value and value[0].shape[0] == image.sum():
            args[name] = [v[visual_rows] for v in value]
            assert args[name][0].shape[0] == kept_visual

    lm, head, embed = adapter.language_model(), adapter.lm_head(), adapter.embed_tokens()
    with torch.inference_mode():
        state = lm(**args, use_cache=True)
        cache = getattr(state, "cache", None) or state.past_key_values
        for step in range(STEPS):
            logits = head(state.last_hidden_state[:, -1])
            assert torch.allclose(logits, out.logits[step], atol=1e-5), f"step {step}"
            token = out.sequences[:, inputs["input_ids"].shape[1] + step, None]
            args = {"inputs_embeds": embed(token), "position_ids": args["position_ids"][..., -1:] + 1,
                    "attention_mask": torch.cat([args["attention_mask"], torch.ones_like(token)], 1)}
            state = lm(**args, past_key_values=cache, use_cache=True)  # "cache" from transformers 5.20 on


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "uniform", "visionzip", "divprune-merge"])
def test_a_batch_gives_each_row_what_it_gets_alone(tiny, family, method):
    """Rows of different lengths, and (Qwen families) images of different sizes, so that rows drop
    different numbers of tokens and one carries dead slots."""
    model, _, adapter = tiny(family)
    sizes = (0, 1) if family.startswith("qwen") else (0, 0)
    inputs = batch(adapter, family, sizes)
    with pruned(model, adapter, METHODS[method](0.5)):
        together = generate(model, adapter, inputs)
        alone = [generate(model, adapter, batch_row) for batch_row in rows_of(adapter, family, sizes)]
    for row, single in enumerate(alone):
        assert together.sequences[row, -STEPS:].tolist() == single.sequences[0, -STEPS:].tolist()
        for a, b in zip(together.logits, single.logits):
            assert torch.allclose(a[row], b[0], atol=1e-4)


def rows_of(adapter, family, sizes):
    images = sample_images(family)
    prompts = ("What color is the circle?", "How many squares?")
    return [adapter.build_batch([Request.chat(p, [images[s]])]) for p, s in zip(prompts, sizes)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_a_hand_written_decode_loop_without_positions_continues_the_original_ones(tiny, family):
    """Without generate's positions, the hooks continue the prefill's own (3-D for M-RoPE)."""
    model, _, adapter = tiny(family)
    inputs = adapter.build_batch([Request.chat("What color is the circle?", [sample_images(family)[0]])])
    with pruned(model, adapter, FastV(k=1, keep=0.5)):
        reference = generate(model, adapter, inputs)
        with torch.inference_mode():
            out = model(**inputs, use_cache=True)
            cache, mask = getattr(out, "cache", None) or out.past_key_values, inputs["attention_mask"]
            for step in range(STEPS):
                assert torch.allclose(out.logits[:, -1], reference.logits[step], atol=1e-5), f"step {step}"
                token = reference.sequences[:, inputs["input_ids"].shape[1] + step, None]
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
