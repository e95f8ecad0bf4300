"""The adapters' vision-token maps against the models themselves: each patch scored in the vision
encoder's last layer must feed the visual token the adapter says it does.

The vision tower's last block (Qwen) or whole output (InternVL) is made to emit every patch's own
index, and the merger / projector to pass indices through unmixed; the image features then name,
per visual token, the patches it was built from."""

import pytest
import torch

from edgelmm.request import Request
from tests.tiny_models import make_image, sample_images


def fed_by(features: torch.Tensor, n_patches: int) -> torch.Tensor:
    """patch -> visual token, read off features whose entries are patch indices."""
    index = torch.full((n_patches,), -1)
    for token, patches in enumerate(features.round().long()):
        index[patches] = token
    return index


@pytest.mark.parametrize("family, size", [("qwen2_vl", None), ("qwen2_5_vl", 224), ("qwen3_vl", None)])
def test_qwen_patches_feed_the_tokens_the_adapter_names(tiny, family, size):
    """Qwen2.5-VL at 224 px: 8x8 merged patches in 16 windows, so its window order matters."""
    model, _, adapter = tiny(family)
    images = [make_image(size, size, seed=3)] if size else list(sample_images(family))
    inputs = adapter.build_batch([Request.chat("What color is the circle?", images)])
    visual = adapter.vision_tower()
    unit = visual.spatial_merge_size**2
    n_patches = inputs["pixel_values"].shape[0]
    last = visual.blocks[-1].register_forward_hook(
        lambda module, args, out: torch.arange(n_patches, dtype=out.dtype)[:, None].expand_as(out).clone())
    visual.merger.forward = lambda x: x.reshape(-1, unit, x.shape[-1])[:, :, 0]  # the patches of each token
    try:
        with torch.inference_mode():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    finally:
        last.remove()
        del visual.merger.forward
    expected = fed_by(torch.cat(list(features)), n_patches)
    mapped = adapter.vision_token_map({"grid_thw": inputs["image_grid_thw"]}, n_patches)
    assert torch.equal(mapped, expected)
    if size:
        assert not torch.equal(mapped, torch.arange(n_patches) // unit)  # the window order was really undone


def test_internvl_patches_feed_the_tokens_the_adapter_names(tiny):
    model, _, adapter = tiny("internvl")
    inputs = adapter.build_batch([Request.chat("What color is the circle?", [sample_images("internvl")[1]])])  # 2 tiles + thumbnail
    tower, projector = adapter.vision_tower(), adapter.projector()
    tiles = inputs["pixel_values"].shape[0]

    def patch_indices(module, args, out):
        length = out.last_hidden_state.shape[1]
        index = torch.arange(tiles * length, dtype=out.last_hidden_state.dtype).view(tiles, length, 1)
        out.last_hidden_state = index.expand_as(out.last_hidden_state).clone()
        return out

    hook = tower.register_forward_hook(patch_indices)
    width = tower.config.hidden_size
    projector.forward = lambda x: x[..., ::width]  # one channel of each shuffled patch
    try:
        with torch.inference_mode():
            features = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default").pooler_output
    finally:
        hook.remove()
        del projector.forward
    n_scored = tiles * (features.shape[1] * 4 + 1)
    mapped = adapter.vision_token_map({"pixel_values": inputs["pixel_values"]}, n_scored)
    assert torch.equal(mapped, fed_by(features.reshape(-1, 4), n_scored))
    assert (mapped == -1).sum() == tiles  # one [CLS] per tile feeds nothing
