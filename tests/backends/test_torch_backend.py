"""The torch backend on tiny random-weight models of real architectures: the three request forms,
outputs against plain transformers, scores against a teacher-forced forward, counts, timings,
streams that agree with whole answers."""

import pytest
import torch

from edgelmm import EdgelmmError, Request, SamplingParams, load
from edgelmm.errors import RequestError
from tests.tiny_models import make_image, save_tiny

GREEDY = SamplingParams(max_new_tokens=6)


def ask(backend, prompt="What color is the circle?", n_images=1, seed=0):
    images = [make_image(seed=seed + i) for i in range(n_images)] if backend.adapter.multimodal else []
    return Request.chat(prompt, images=images)


def reference_ids(backend, request, max_new_tokens):
    """Plain transformers greedy generation on the same inputs, up to and including the end token."""
    inputs = backend.adapter.build_inputs(request)
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = backend.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=backend.adapter.eos_token_ids(), pad_token_id=backend.adapter.tokenizer.pad_token_id,
        )
    ids = out[0, n:].tolist()
    eos = set(backend.adapter.eos_token_ids())
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in eos), ids)


def teacher_forced(backend, request, continuation):
    """log p(token | everything before) for every prompt + continuation token after the first."""
    inputs = backend.adapter.build_inputs(request)
    full = backend.adapter.append_tokens(inputs, torch.tensor(continuation, dtype=torch.long))
    with torch.inference_mode():
        logits = backend.model(**full).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1)
    ids = full["input_ids"][0]
    return logprobs.gather(1, ids[1:, None])[:, 0], logprobs


def test_greedy_matches_plain_transformers(backend):
    request = ask(backend)
    [result] = backend.generate([request], GREEDY)
    assert result.token_ids == reference_ids(backend, request, GREEDY.max_new_tokens)
    eos = set(backend.adapter.eos_token_ids())
    assert result.text == backend.adapter.decode([t for t in result.token_ids if t not in eos])


def test_the_end_token_is_kept_in_ids_logprobs_and_counts(backend):
    """As vLLM: a model that stops on its end token reports it (lm-eval's loglikelihood drops the
    last entry and needs the real answer tokens before it)."""
    eos = backend.adapter.eos_token_ids()[0]
    head = backend.adapter.lm_head()
    # make the end token the model's first choice: bias the logits at the output layer
    bias = torch.zeros(head.out_features)
    bias[eos] = 1e4
    handle = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        [result] = backend.generate([ask(backend)], GREEDY.model_copy(update={"logprobs": True}))
        events = list(backend.stream(ask(backend), GREEDY.model_copy(update={"logprobs": True})))
    finally:
        handle.remove()
    assert result.token_ids == [eos] and result.text == ""
    assert result.finish_reason == "stop" and result.stop_reason == eos
    assert result.counts.generated_tokens == 1 and len(result.logprobs) == 1
    streamed = events[-1].result
    assert [e.token_id for e in events if e.token_id is not None] == [eos]
    assert (streamed.token_ids, streamed.finish_reason, streamed.text) == ([eos], "stop", "")


def test_counts_and_timings(backend):
    request = ask(backend)
    [result] = backend.generate([request], GREEDY)
    inputs = backend.adapter.build_inputs(request)
    assert result.counts.prompt_tokens == inputs["input_ids"].shape[1] == len(result.prompt_token_ids)
    assert result.prompt_token_ids == inputs["input_ids"][0].tolist()
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


def test_logprobs_and_top_logprobs_are_the_models_own(backend):
    request = ask(backend)
    [result] = backend.generate([request], GREEDY.model_copy(update={"top_logprobs": 3}))
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    n = len(result.prompt_token_ids)
    chosen, logprobs = teacher_forced(backend, request, result.token_ids)
    assert torch.allclose(torch.tensor(result.logprobs), chosen[n - 1:], atol=1e-4)
    for step, top in enumerate(result.top_logprobs):
        values, indices = logprobs[n - 1 + step].topk(3)
        assert [t for t, _ in top] == indices.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=1e-4)
        assert top[0][0] == result.token_ids[step]  # greedy picks the most likely token


def test_prompt_logprobs_equal_a_teacher_forced_forward(backend):
    request = ask(backend)
    [result] = backend.generate([request], SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    assert result.token_ids == [] and result.counts.generated_tokens == 0
    scores = result.prompt_logprobs
    assert [s.token_id for s in scores] == result.prompt_token_ids
    assert scores[0].logprob is None and scores[0].top == []
    chosen, logprobs = teacher_forced(backend, request, [])
    assert torch.allclose(torch.tensor([s.logprob for s in scores[1:]]), chosen, atol=1e-4)
    assert [[t for t, _ in s.top] for s in scores[1:]] == logprobs.topk(2).indices.tolist()


def test_prompt_logprobs_of_a_batch_ignore_padding(backend):
    requests = [ask(backend, "What color is the circle?", seed=1), ask(backend, "Hi?", seed=2)]
    batched = backend.generate(requests, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    for request, result in zip(requests, batched):
        [alone] = backend.generate([request], SamplingParams(max_new_tokens=0, prompt_logprobs=0))
        assert [s.token_id for s in result.prompt_logprobs] == [s.token_id for s in alone.prompt_logprobs]
        assert [s.logprob for s in result.prompt_logprobs[1:]] == pytest.approx(
            [s.logprob for s in alone.prompt_logprobs[1:]], abs=1e-4)


def test_token_ids_and_text_requests_read_what_a_chat_request_reads(backend):
    chat = ask(backend)
    [answer] = backend.generate([chat], GREEDY)
    images = chat.all_images()
    by_ids = Request(token_ids=answer.prompt_token_ids, images=images)
    [again] = backend.generate([by_ids], GREEDY)
    assert again.prompt_token_ids == answer.prompt_token_ids and again.token_ids == answer.token_ids
    text = backend.adapter.chat_text(chat.messages)
    [raw] = backend.generate([Request(text=text, images=images)], GREEDY)
    if backend.adapter.multimodal or not backend.adapter._starts_with_bos(text):
        assert raw.token_ids == answer.token_ids


def test_multi_turn_messages_keep_images_where_they_are(backend):
    if not backend.adapter.multimodal:
        pytest.skip("a text-only model")
    first, second = make_image(seed=1), make_image(seed=2)
    request = Request(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": [{"type": "text", "text": "Now:"}, {"type": "image", "image": second}]},
    ])
    text = backend.adapter.chat_text(request.messages)
    assert text.index("Answer briefly.") < text.index("And this one?") < text.index("A circle.") < text.index("Now:")
    [result] = backend.generate([request], GREEDY)
    ids = result.prompt_token_ids
    mask = backend.adapter.image_token_mask(torch.tensor([ids]))[0].tolist()
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 2 and result.counts.visual_tokens == sum(mask)


def test_batch_matches_single_requests(backend):
    requests = [ask(backend, "What color is the circle?", seed=1), ask(backend, "How many shapes are there here?", seed=2)]
    batched = backend.generate(requests, GREEDY)
    single = [backend.generate([r], GREEDY)[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.counts.prompt_tokens for r in batched] == [r.counts.prompt_tokens for r in single]


def test_stream_agrees_with_the_whole_answer(backend):
    request = ask(backend)
    params = GREEDY.model_copy(update={"logprobs": True, "top_logprobs": 2})
    events = list(backend.stream(request, params))
    final = events[-1].result
    whole = backend.generate([request], params)[0]
    assert final is not None and all(e.result is None for e in events[:-1])
    assert "".join(e.text for e in events) == final.text == whole.text
    assert [e.token_id for e in events if e.token_id is not None] == final.token_ids == whole.token_ids
    assert [e.logprob for e in events if e.token_id is not None] == final.logprobs
    assert final.logprobs == pytest.approx(whole.logprobs, abs=1e-5)
    assert (final.finish_reason, final.stop_reason) == (whole.finish_reason, whole.stop_reason)
    assert [e.top for e in events if e.token_id is not None] == final.top_logprobs
    times = [e.time_s for e in events]
    assert times == sorted(times)


def test_sampling_is_reproducible_with_a_seed(backend):
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = backend.generate([ask(backend)], params)[0].token_ids
    b = backend.generate([ask(backend)], params)[0].token_ids
    assert a == b


def test_stop_string_ends_text_and_stream_never_shows_it(backend):
    eos = set(backend.adapter.eos_token_ids())
    [result] = backend.generate([ask(backend)], SamplingParams(max_new_tokens=8))
    text = result.text
    if len(text.strip()) < 3:
        pytest.skip("tiny model produced too little text to cut")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    params = SamplingParams(max_new_tokens=8, stop=[stop])
    [cut] = backend.generate([ask(backend)], params)
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop in backend.adapter.decode([t for t in cut.token_ids if t not in eos])  # its tokens stay
    events = list(backend.stream(ask(backend), params))
    shown = "".join(e.text for e in events)
    assert shown == cut.text and stop not in shown
    assert events[-1].result.token_ids == cut.token_ids


def test_bad_requests_are_request_errors(backend):
    vocab = backend.adapter.text_config.vocab_size
    with pytest.raises(RequestError, match="outside the model's vocabulary"):
        backend.generate([Request(token_ids=[1, vocab + 5])], GREEDY)
    if backend.adapter.multimodal:
        image_token = backend.adapter.image_token_id
        with pytest.raises(RequestError, match="image token.*no image"):
            backend.generate([Request(token_ids=[1, image_token, 2])], GREEDY)
        with pytest.raises(RequestError, match="image token"):  # the right image, too few tokens
            backend.generate([Request(token_ids=[1, image_token, 2], images=[make_image()])], GREEDY)
        placeholder = backend.adapter.processor.image_token
        with pytest.raises(RequestError, match="placeholders"):  # a placeholder typed by the user, no image
            backend.generate([Request(text=f"what is {placeholder} here?")], GREEDY)
    with pytest.raises(RequestError, match="context"):
        backend.generate([ask(backend)], SamplingParams(max_new_tokens=100_000))


def test_images_to_a_text_only_model_are_refused(tmp_path):
    path = save_tiny("qwen3", tmp_path / "qwen3")
    with load(str(path), device="cpu") as engine:
        with pytest.raises(EdgelmmError, match="text-only language model"):
            engine.generate([Request.chat("hi", images=[make_image()])], GREEDY)


def test_malformed_requests():
    with pytest.raises(RequestError, match="exactly one of"):
        Request(text="a", token_ids=[1])
    with pytest.raises(RequestError, match="inside its messages"):
        Request(messages=[{"role": "user", "content": "hi"}], images=[make_image()])
    with pytest.raises(RequestError, match="role"):
        Request(messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(RequestError, match="content"):
        Request(messages=[{"role": "user", "content": [{"type": "audio"}]}])


def test_generate_without_a_model_is_an_error():
    from edgelmm.backends.torch_backend import TorchBackend

    with pytest.raises(EdgelmmError, match="no model loaded"):
        TorchBackend().generate([Request(text="hi")], GREEDY)


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
