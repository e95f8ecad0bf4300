"""KV states kept between calls (draft-verify, sessions): every path against one full forward pass
of the model over the same ids, on tiny random models of three families (M-RoPE included)."""

import pytest
import torch

from edgelmm import EdgelmmError, ModelSpec, Request, load
from tests.tiny_models import make_image, save_tiny


def ask(backend, text="What color is the circle?"):
    return Request.chat(text, images=[make_image()] if backend.adapter.multimodal else [])


def reference(backend, request, tokens, rows):
    """The model's own logits after the last `rows` positions of prompt + tokens."""
    inputs = backend.adapter.append_tokens(backend.adapter.build_inputs(request), torch.tensor(tokens))
    with torch.inference_mode():
        return backend.model(**inputs).logits[0, -rows:].float()


def test_open_and_extend_match_a_full_forward(backend):
    runner = backend.kv_runner()
    request = ask(backend)
    state, first = runner.open(request, [5, 9])
    assert first.shape[0] == 3 and state.ids[state.prompt_tokens:] == [5, 9]
    rows = runner.extend(state, [11, 3])
    got = torch.cat([first, rows])
    torch.testing.assert_close(got, reference(backend, request, [5, 9, 11, 3], 5), atol=1e-5, rtol=1e-4)


def test_tail_crops_to_the_common_prefix_and_reads_only_the_rest(backend):
    runner = backend.kv_runner()
    request = ask(backend)
    state, _ = runner.open(request, [5, 9, 11, 3])
    prompt = state.ids[: state.prompt_tokens]
    rows, read = runner.tail(state, prompt + [5, 9, 7, 2], 3)
    assert read == 3  # 5 was kept; 9 is read again, for the logits after it
    torch.testing.assert_close(rows, reference(backend, request, [5, 9, 7, 2], 3), atol=1e-5, rtol=1e-4)
    rows, read = runner.tail(state, prompt + [1], 2)  # back to the prompt's own logits
    assert read == 1
    torch.testing.assert_close(rows, reference(backend, request, [1], 2), atol=1e-5, rtol=1e-4)
    with pytest.raises(EdgelmmError, match="cannot be cropped into its prompt"):
        runner.crop(state, state.prompt_tokens - 1)
    with pytest.raises(EdgelmmError, match="positions"):
        runner.tail(state, prompt + [1], 3)


def test_many_states_in_one_pass_equal_each_alone(backend):
    runner = backend.kv_runner()
    a, _ = runner.open(ask(backend), [3, 4])
    b, _ = runner.open(ask(backend, "How many shapes are there?"))
    together = runner.extend_many([a, b], [[5, 6, 7], [8]])
    alone_a, _ = runner.open(ask(backend), [3, 4])
    alone_b, _ = runner.open(ask(backend, "How many shapes are there?"))
    torch.testing.assert_close(together[0], runner.extend(alone_a, [5, 6, 7]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1], runner.extend(alone_b, [8]), atol=1e-5, rtol=1e-4)
    # and each state goes on as if it had been extended alone
    torch.testing.assert_close(runner.extend(a, [9]), runner.extend(alone_a, [9]), atol=1e-5, rtol=1e-4)


def test_a_pruned_model_keeps_no_state(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    engine = load(ModelSpec(path=str(path), device="cpu", methods=["fastv(k=1, keep=0.5)"]))
    with pytest.raises(EdgelmmError, match="pruning"):
        engine.kv_runner().open(ask(engine))
