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


def test_openings_together_equal_each_alone(backend):
    """Same-length prompts are prefilled in one pass; others alone; a bad one fails alone."""
    runner = backend.kv_runner()
    requests = [ask(backend), ask(backend, "What color is the square?"), ask(backend, "How many shapes are there here?"),
                ask(backend)]
    tokens = [[5, 9], [5, 9], [], [10**9]]
    opened = runner.open_many(requests, tokens)
    assert isinstance(opened[3], EdgelmmError)  # an id outside the vocabulary: that request alone
    for request, extra, (state, rows) in zip(requests, tokens, opened[:3]):
        alone, alone_rows = runner.open(request, extra)
        assert state.ids == alone.ids and state.prompt_tokens == alone.prompt_tokens
        torch.testing.assert_close(rows, alone_rows, atol=1e-5, rtol=1e-4)
        assert state.cache.get_seq_length() == len(state.ids) and state.cache.layers[0].keys.shape[0] == 1
        # and the state goes on as one opened alone
        torch.testing.assert_close(runner.extend(state, [11]), runner.extend(alone, [11]), atol=1e-5, rtol=1e-4)


def test_openings_together_fill_the_prefix_cache(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    engine = load(ModelSpec(path=str(path), device="cpu", options={"prefix_cache_mb": 16}))
    runner, cache = engine.kv_runner(), engine.prefix_cache
    first, second = ask(engine), ask(engine, "What color is the square?")
    runner.open_many([first, second], [[], []])
    assert cache.stats()["misses"] == 2 and cache.stats()["blocks"] > 0
    state, rows = runner.open(second, [4])  # all but its last block comes from the tree
    assert cache.stats()["hits"] == 1
    alone = load(ModelSpec(path=str(path), device="cpu")).kv_runner().open(second, [4])
    torch.testing.assert_close(rows, alone[1], atol=1e-5, rtol=1e-4)


def test_a_pruned_model_keeps_no_state(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    engine = load(ModelSpec(path=str(path), device="cpu", methods=["fastv(k=1, keep=0.5)"]))
    with pytest.raises(EdgelmmError, match="pruning"):
        engine.kv_runner().open(ask(engine))
