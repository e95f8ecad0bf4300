"""Every family's adapter on a tiny model of the real class: structure, inputs, image tokens, generation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from edgelmm.request import Request
from tests.tiny_models import CAUSAL_FAMILIES, FAMILIES, QWEN_IMAGE, VLM_FAMILIES, sample_images

IMAGE_MARKERS = {  # what the chat template writes for one image, before the processor expands it
    "llava": "<image>",
    "internvl": "<IMG_CONTEXT>",
    **{family: QWEN_IMAGE for family in VLM_FAMILIES if family.startswith("qwen")},
}


def expected_image_tokens(model: nn.Module, image: Image.Image) -> int:
    """Image tokens the processor must insert, from the model config and the image size alone."""
    config, (width, height) = model.config, image.size
    vision = config.vision_config
    if config.model_type == "llava":  # the image is resized to image_size; CLS is dropped ("default")
        return (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "internvl":  # per 56x56 tile, pixel-shuffled; a 2:1 image is 2 tiles + a thumbnail
        per_tile = (vision.image_size[0] // vision.patch_size[0]) ** 2 * config.downsample_ratio**2
        return int(per_tile) * (1 if width == height else 3)
    unit = vision.patch_size * vision.spatial_merge_size  # Qwen: one token per merged patch
    return (width // unit) * (height // unit)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_attention_and_mlp_are_those_of_the_decoder(tiny, family):
    model, _, adapter = tiny(family)
    layers = adapter.language_layers()
    assert len(layers) == adapter.text_config.num_hidden_layers == 2
    decoder = adapter.language_model()
    for i, layer in enumerate(layers):
        assert layer is decoder.layers[i]
        assert adapter.attention(i) is layer.self_attn and adapter.mlp(i) is layer.mlp
        assert hasattr(adapter.attention(i), "q_proj")
    assert adapter.embed_tokens() is decoder.embed_tokens
    assert all(module is not adapter.lm_head() for module in decoder.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_lm_head_span_the_tokenizer(tiny, family):
    _, _, adapter = tiny(family)
    vocab = len(adapter.tokenizer)
    assert adapter.text_config.vocab_size == vocab
    assert adapter.embed_tokens().num_embeddings == vocab
    assert isinstance(adapter.lm_head(), nn.Linear) and adapter.lm_head().out_features == vocab


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_vision_tower_and_projector(tiny, family):
    model, _, adapter = tiny(family)
    tower, projector = adapter.vision_tower(), adapter.projector()
    assert isinstance(tower, nn.Module) and isinstance(projector, nn.Module)
    language = set(map(id, adapter.language_model().modules()))
    assert id(tower) not in language and id(projector) not in language
    ids = set(map(id, model.modules()))
    assert id(tower) in ids and id(projector) in ids
    # the projector's output feeds the decoder, so it ends in the decoder's width
    last_linear = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == adapter.text_config.hidden_size


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_causal_lm_has_no_vision_side(tiny, family):
    _, _, adapter = tiny(family)
    assert adapter.family == "causal_lm" and not adapter.multimodal
    assert adapter.vision_tower() is None and adapter.projector() is None and adapter.image_token_id is None
    assert not adapter.image_token_mask(torch.arange(50)[None]).any()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_token_id_is_the_family_token(tiny, family):
    _, processor, adapter = tiny(family)
    token = {"llava": "<image>", "internvl": "<IMG_CONTEXT>"}.get(family, "<|image_pad|>")
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids(token) == processor.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_token_ids_hold_the_end_of_turn_token(tiny, family):
    _, _, adapter = tiny(family)
    assert adapter.tokenizer.eos_token_id in adapter.eos_token_ids()


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_chat_text_has_one_marker_per_image(tiny, family):
    _, _, adapter = tiny(family)
    square, wide = sample_images(family)
    text = adapter.chat_text(Request.chat("What color is the circle?", [square, wide]).messages)
    assert text.count(IMAGE_MARKERS[family]) == 2 and "What color is the circle?" in text


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2])
def test_build_inputs_expands_each_image_to_its_token_count(tiny, family, n_images):
    model, _, adapter = tiny(family)
    images = list(sample_images(family))[:n_images]
    inputs = adapter.build_inputs(Request.chat("What color is the circle?", images))
    mask = adapter.image_token_mask(inputs["input_ids"])
    assert mask.dtype == torch.bool and mask.shape == inputs["input_ids"].shape
    assert int(mask.sum()) == sum(expected_image_tokens(model, image) for image in images)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(adapter.tokenizer)) and torch.isfinite(logits).all()


def assert_left_padded(inputs: dict[str, torch.Tensor], pad_id: int) -> None:
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    assert attention[:, -1].all(), "every row must end in a real token (left padding)"
    short = int(attention.sum(1).argmin())
    assert attention[short, 0] == 0 and (ids[short][attention[short] == 0] == pad_id).all()
    assert (attention.diff(dim=1) >= 0).all(), "padding only at the start"


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batch_of_two_prompts_with_images_is_left_padded_and_generates(tiny, family):
    model, _, adapter = tiny(family)
    square, wide = sample_images(family)
    inputs = adapter.build_batch([Request.chat("Describe the picture in one sentence please.", [square]), Request.chat("Color?", [wide])])
    assert_left_padded(inputs, adapter.tokenizer.pad_token_id)
    counts = adapter.image_token_mask(inputs["input_ids"]).sum(1).tolist()
    assert counts == [expected_image_tokens(model, square), expected_image_tokens(model, wide)]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (2, prompt_len + 3) and torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert all(isinstance(adapter.decode(row[prompt_len:].tolist()), str) for row in out)


@pytest.mark.parametrize("family", FAMILIES)
def test_batching_does_not_change_a_prompts_next_token_logits(tiny, family):
    """Left padding, attention mask and (m)RoPE positions line up: batched == one at a time."""
    model, _, adapter = tiny(family)
    square, wide = ([image] for image in sample_images(family)) if adapter.multimodal else ([], [])
    items = [Request.chat("Describe it in one sentence.", square), Request.chat("Color?", wide)]
    with torch.no_grad():
        batched = model(**adapter.build_batch(items)).logits[:, -1]
        alone = torch.cat([model(**adapter.build_inputs(item)).logits[:, -1] for item in items])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_batch_is_left_padded_and_generates(tiny, family):
    model, _, adapter = tiny(family)
    inputs = adapter.build_batch([Request.chat("Hello! How can I help you today?", []), Request.chat("Hi", [])])
    assert_left_padded(inputs, adapter.tokenizer.pad_token_id)
    assert not adapter.image_token_mask(inputs["input_ids"]).any()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_starts_each_prompt_exactly_once(tiny, family):
    """llava's template has no BOS and its tokenizer adds one; llama's (Llama-3) template writes
    it and the tokenizer must not add a second; the Qwen-style families have none."""
    _, _, adapter = tiny(family)
    bos = adapter.tokenizer.bos_token_id
    inputs = adapter.build_batch([Request.chat("What color is the circle?", []), Request.chat("Hi", [])])
    for ids, attention in zip(inputs["input_ids"], inputs["attention_mask"]):
        real = ids[attention.bool()].tolist()
        assert real.count(bos) == (bos is not None) and (bos is None or real[0] == bos)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_drops_special_tokens(tiny, family):
    _, _, adapter = tiny(family)
    ids = adapter.tokenizer.encode("The circle is red.", add_special_tokens=False)
    assert adapter.decode([*ids, adapter.tokenizer.eos_token_id]) == "The circle is red."
