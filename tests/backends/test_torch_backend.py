"""The torch backend on tiny random-weight models of real architectures: outputs, counts, timings."""

import pytest
import torch

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load
from tests.tiny_models import make_image, save_tiny

GREEDY = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2"])
def backend(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    engine = load(ModelSpec(path=str(path), device="cpu"))
    yield engine
    engine.close()


def ask(backend, prompt="What color is the circle?", n_images=1, seed=0):
    images = [make_image(seed=seed + i) for i in range(n_images)] if backend.adapter.multimodal else []
    return Request(prompt, images=images)


def reference_ids(backend, request, max_new_tokens):
    """Plain transformers greedy generation on the same inputs."""
    inputs = backend.adapter.build_batch([(request.prompt, request.images)])
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = backend.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=backend.adapter.eos_token_ids(), pad_token_id=backend.adapter.tokenizer.pad_token_id,
        )
    ids = out[0, n:].tolist()
    eos = set(backend.adapter.eos_token_ids())
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def test_greedy_matches_plain_transformers(backend):
    request = ask(backend)
    [result] = backend.generate([request], GREEDY)
    assert result.token_ids == reference_ids(backend, request, GREEDY.max_new_tokens)
    assert result.text == backend.adapter.decode(result.token_ids)


def test_counts_and_timings(backend):
    request = ask(backend)
    [result] = backend.generate([request], GREEDY)
    inputs = backend.adapter.build_batch([(request.prompt, request.images)])
    assert result.counts.prompt_tokens == inputs["input_ids"].shape[1]
    expected_visual = int(backend.adapter.image_token_mask(inputs["input_ids"]).sum())
    assert result.counts.visual_tokens == expected_visual
    assert (expected_visual > 0) == backend.adapter.multimodal
    n = result.counts.generated_tokens
    assert n == len(result.token_ids) <= GREEDY.max_new_tokens
    t = result.timings
    assert t.ttft_s > 0 and len(t.decode_s) == max(n - 1, 0) and all(d > 0 for d in t.decode_s)
    assert t.e2e_s >= t.ttft_s + sum(t.decode_s) - 1e-6
    assert result.peak_memory_bytes and result.peak_memory_bytes > 10 * 2**20
    assert result.finish_reason in {"stop", "length"}


def test_logprobs_are_the_models_own(backend):
    request = ask(backend)
    params = GREEDY.model_copy(update={"logprobs": True})
    [result] = backend.generate([request], params)
    assert len(result.logprobs) == len(result.token_ids)
    # Teacher-forced forward pass over prompt + generated tokens gives the same log-probabilities.
    inputs = backend.adapter.build_batch([(request.prompt, request.images)])
    n = inputs["input_ids"].shape[1]
    ids = torch.tensor([result.token_ids])
    full = {  # every per-token input grows by the generated tokens (text: ones / zeros)
        k: torch.cat([v, ids if k == "input_ids" else torch.full_like(ids, int(k == "attention_mask"))], 1)
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == n else v
        for k, v in inputs.items()
    }
    with torch.inference_mode():
        logits = backend.model(**full).logits[0, n - 1 : -1].float()
    expected = torch.log_softmax(logits, -1).gather(1, ids[0, :, None])[:, 0]
    assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)
    # greedy picks the most likely token each step
    assert torch.allclose(torch.tensor(result.logprobs), torch.log_softmax(logits, -1).max(-1).values, atol=1e-4)


def test_batch_matches_single_requests(backend):
    requests = [ask(backend, "What color is the circle?", seed=1), ask(backend, "How many shapes are there here?", seed=2)]
    batched = backend.generate(requests, GREEDY)
    single = [backend.generate([r], GREEDY)[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.counts.prompt_tokens for r in batched] == [r.counts.prompt_tokens for r in single]


def test_stream_yields_the_generated_text(backend):
    request = ask(backend)
    params = GREEDY.model_copy(update={"logprobs": True})
    events = list(backend.stream(request, params))
    final = events[-1].result
    assert final is not None and all(e.result is None for e in events[:-1])
    assert "".join(e.text for e in events) == final.text
    assert [e.token_id for e in events if e.token_id is not None] == final.token_ids
    assert final.token_ids == backend.generate([request], GREEDY)[0].token_ids
    assert [e.logprob for e in events if e.token_id is not None] == final.logprobs
    times = [e.time_s for e in events]
    assert times == sorted(times)


def test_sampling_is_reproducible_with_a_seed(backend):
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = backend.generate([ask(backend)], params)[0].token_ids
    b = backend.generate([ask(backend)], params)[0].token_ids
    assert a == b


def test_stop_string_trims_text(backend):
    [result] = backend.generate([ask(backend)], SamplingParams(max_new_tokens=8))
    if len(result.text.strip()) < 2:
        pytest.skip("tiny model produced too little text to cut")
    stop = result.text.strip()[1]
    [cut] = backend.generate([ask(backend)], SamplingParams(max_new_tokens=8, stop=[stop]))
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert result.text.startswith(cut.text)


def test_images_to_a_text_only_model_are_refused(tmp_path):
    path = save_tiny("qwen3", tmp_path / "qwen3")
    with load(str(path), device="cpu") as engine:
        with pytest.raises(EdgelmmError, match="text-only language model"):
            engine.generate([Request("hi", images=[make_image()])], GREEDY)


def test_generate_without_a_model_is_an_error():
    from edgelmm.backends.torch_backend import TorchBackend

    with pytest.raises(EdgelmmError, match="no model loaded"):
        TorchBackend().generate([Request("hi")], GREEDY)


def test_unknown_backend_lists_choices():
    with pytest.raises(EdgelmmError, match="unknown backend 'nope'.*torch"):
        load("shapes-vlm-s", backend="nope")


def test_closing_a_stream_stops_generation(backend):
    steps = []
    hook = backend.adapter.lm_head().register_forward_hook(lambda *_: steps.append(1))
    try:
        params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=0)
        stream = backend.stream(ask(backend), params)
        next(stream)
        stream.close()  # what a server does when its client disconnects
    finally:
        hook.remove()
    assert len(steps) < 10  # generation ended within a token or two, not after 200
