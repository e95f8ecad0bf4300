"""The openai backend against our own server on 127.0.0.1: the same answers as the model in
process, client-side timings, retries with back-off, and clear errors."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load  # noqa: E402
from edgelmm.serve import BackgroundServer, Limits, build  # noqa: E402
from edgelmm.serve.server import free_port  # noqa: E402
from tests.tiny_models import make_image, save_tiny  # noqa: E402

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = save_tiny("llava", tmp_path_factory.mktemp("openai") / MODEL)
    app, engine = build(ModelSpec(path=str(path), device="cpu"), api_key="k", served_name=MODEL)
    with BackgroundServer(app) as server:
        yield server, engine
    engine.close()


def remote(server, **options):
    return load(ModelSpec(path=MODEL, options={"base_url": server.url + "/v1", "api_key": "k", "return_token_ids": True,
                                               "backoff_s": 0.01, **options}), backend="openai")


def requests() -> list[Request]:
    return [Request.chat("What color is the circle?", [make_image(seed=i)]) for i in range(3)] + [Request.chat("Hello!")]


def test_same_greedy_answers_as_in_process(served):
    server, engine = served
    params = SamplingParams(max_new_tokens=6, logprobs=True)
    local = [engine.backend.generate([r], params)[0] for r in requests()]
    with remote(server) as backend:
        results = backend.generate(requests(), params)
    for here, there in zip(local, results):
        assert there.token_ids == here.token_ids and there.text == here.text
        assert there.logprobs == pytest.approx(here.logprobs, abs=1e-4)
        assert there.counts.prompt_tokens == here.counts.prompt_tokens
        assert there.counts.generated_tokens == len(here.token_ids)
        assert there.finish_reason == here.finish_reason


def test_every_request_form_is_forwarded_as_it_is(served):
    """Messages (several turns, an image between two texts), raw text and token ids reach the
    server unchanged: the answers equal the model's in process, token ids never re-tokenized."""
    server, engine = served
    image = make_image(seed=5)
    conversation = Request(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its color?"},
    ])
    text = Request(text="What color is the circle?")
    ids = Request(token_ids=engine.backend.prompt_token_ids(requests()[0]), images=requests()[0].all_images())
    params = SamplingParams(max_new_tokens=5, top_logprobs=2)
    with remote(server) as backend:
        for request in (conversation, text, ids):
            [here] = engine.backend.generate([request], params)
            [there] = backend.generate([request], params)
            assert there.token_ids == here.token_ids and there.text == here.text
            assert there.counts.prompt_tokens == here.counts.prompt_tokens
            assert [[t for t, _ in top] for top in there.top_logprobs] == [[t for t, _ in top] for top in here.top_logprobs]


def test_prompt_logprobs_through_echo_and_chat(served):
    server, engine = served
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=1)
    prompt = engine.backend.prompt_token_ids(Request.chat("What color is the circle?"))
    with remote(server) as backend:
        for request in (Request(token_ids=prompt), Request.chat("What color is the circle?")):
            [here] = engine.backend.generate([request], params)
            [there] = backend.generate([request], params)
            assert there.prompt_token_ids == here.prompt_token_ids == prompt
            assert [s.token_id for s in there.prompt_logprobs] == prompt
            assert there.prompt_logprobs[0].logprob is None
            assert [s.logprob for s in there.prompt_logprobs[1:]] == pytest.approx(
                [s.logprob for s in here.prompt_logprobs[1:]], abs=1e-4)
            assert there.token_ids == here.token_ids
            assert there.text == here.text  # a whole chat answer's text is in its message


def test_client_side_timings_and_stream(served):
    server, _ = served
    with remote(server) as backend:
        events = list(backend.stream(requests()[0], SamplingParams(max_new_tokens=8)))
        result = events[-1].result
        assert backend.device_name().startswith("remote (http://127.0.0.1")
    token_events = [e for e in events[:-1] if e.token_id is not None]
    assert [e.token_id for e in token_events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    t = result.timings
    assert 0 < t.ttft_s <= t.e2e_s and len(t.decode_s) == len(result.token_ids) - 1 and all(d >= 0 for d in t.decode_s)
    times = [e.time_s for e in events]
    assert times == sorted(times)
    assert result.peak_memory_bytes is None


def test_without_token_ids_it_counts_text_pieces(served):
    server, _ = served
    with remote(server, return_token_ids=False) as backend:
        [result] = backend.generate([Request.chat("Hello!")], SamplingParams(max_new_tokens=5))
    assert result.token_ids == [] and result.counts.generated_tokens >= 1 and result.text is not None


def test_wrong_model_key_or_option_fail_at_load(served):
    server, _ = served
    with pytest.raises(EdgelmmError, match="does not serve 'nope'.*tiny-llava"):
        load(ModelSpec(path="nope", options={"base_url": server.url + "/v1", "api_key": "k"}), backend="openai")
    with pytest.raises(EdgelmmError, match="401.*API key"):
        load(ModelSpec(path=MODEL, options={"base_url": server.url + "/v1", "api_key": "bad"}), backend="openai")
    with pytest.raises(EdgelmmError, match="unknown option.*bse_url"):
        load(ModelSpec(path=MODEL, options={"bse_url": server.url}), backend="openai")
    with pytest.raises(EdgelmmError, match="base_url"):
        load(ModelSpec(path=MODEL), backend="openai")


def test_request_errors_are_not_retried(served):
    server, _ = served
    with remote(server, retries=5, backoff_s=1.0) as backend:
        start = time.monotonic()
        with pytest.raises(EdgelmmError, match="400.*context"):
            backend.generate([Request.chat("circle " * 1200)], SamplingParams(max_new_tokens=4))
        assert time.monotonic() - start < 1.0  # no back-off sleeps


def test_connection_errors_are_retried_then_reported():
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(EdgelmmError, match="cannot reach"):
        load(ModelSpec(path=MODEL, options={"base_url": f"http://127.0.0.1:{port}/v1", "retries": 2, "backoff_s": 0.1}),
             backend="openai")
    assert time.monotonic() - start >= 0.1 + 0.2  # two back-off waits: 0.1 s, then 0.2 s


def test_busy_server_is_retried(tmp_path):
    """503 (queue full) is retried with back-off: a server with no queue room answers 503 every time."""
    path = save_tiny("qwen2", tmp_path / "m")
    app, engine = build(ModelSpec(path=str(path), device="cpu"), limits=Limits(max_queue=0), served_name="m")
    with BackgroundServer(app) as server:
        backend = load(ModelSpec(path="m", options={"base_url": server.url + "/v1", "retries": 2, "backoff_s": 0.01}),
                       backend="openai")
        with pytest.raises(EdgelmmError, match="503.*busy"):
            backend.generate([Request.chat("hi")], SamplingParams(max_new_tokens=2))
        backend.close()
        import httpx

        metrics = httpx.get(server.url + "/metrics").text
        assert 'edgelmm_requests_total{route="/v1/chat/completions",status="503"} 3' in metrics  # 1 try + 2 retries
    engine.close()


def test_every_sampler_is_sent_so_server_defaults_never_decide(served, monkeypatch):
    """llama.cpp's server samples with top_k 40, min_p 0.05 and (older) repeat penalty 1.1 unless told."""
    server, _ = served
    sent = []
    with remote(server) as backend:
        post = backend.client.stream
        monkeypatch.setattr(backend.client, "stream", lambda method, route, json: sent.append(json) or post(method, route, json=json))
        backend.generate([Request.chat("Hello!")], SamplingParams(max_new_tokens=2))
    assert {k: sent[0][k] for k in ("top_k", "min_p", "repetition_penalty", "repeat_penalty", "presence_penalty",
                                    "frequency_penalty", "temperature", "top_p")} == {
        "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "temperature": 0.0, "top_p": 1.0}


def test_a_stream_without_usage_gives_unknown_prompt_tokens(served, monkeypatch):
    from edgelmm.backends import openai_backend

    server, _ = served
    real = openai_backend.request_body

    def no_usage(*args, **kwargs):
        route, body = real(*args, **kwargs)
        body.pop("stream_options", None)  # as servers that never send usage in streams
        return route, body

    monkeypatch.setattr(openai_backend, "request_body", no_usage)
    with remote(server) as backend:
        [result] = backend.generate([Request.chat("Hello!")], SamplingParams(max_new_tokens=3))
    assert result.counts.prompt_tokens is None and result.counts.generated_tokens >= 1


def test_a_server_that_drops_images_is_detected_once(tmp_path, monkeypatch):
    """A server without the vision part answers from the text alone; the first image request says so."""
    from edgelmm.serve import app as server_app

    path = save_tiny("llava", tmp_path / MODEL)
    real = server_app._chat_request

    async def drop_images(state, messages):
        for m in messages:
            if isinstance(m.content, list):
                m.content = [p for p in m.content if p.type == "text"]
        return await real(state, messages)

    app, engine = build(ModelSpec(path=str(path), device="cpu"), served_name=MODEL)
    with BackgroundServer(app) as server:
        good = load(ModelSpec(path=MODEL, options={"base_url": server.url + "/v1"}), backend="openai")
        good.generate([Request.chat("What color?", [make_image()])], SamplingParams(max_new_tokens=2))
        monkeypatch.setattr(server_app, "_chat_request", drop_images)
        bad = load(ModelSpec(path=MODEL, options={"base_url": server.url + "/v1"}), backend="openai")
        assert bad.generate([Request.chat("Hello!")], SamplingParams(max_new_tokens=2))  # no image, no check
        with pytest.raises(EdgelmmError, match="ignores images.*--mmproj"):
            bad.generate([Request.chat("What color?", [make_image()])] * 2, SamplingParams(max_new_tokens=2))
        trusting = load(ModelSpec(path=MODEL, options={"base_url": server.url + "/v1", "check_images": False}), backend="openai")
        assert trusting.generate([Request.chat("What color?", [make_image()])], SamplingParams(max_new_tokens=2))
        for b in (good, bad, trusting):
            b.close()
    engine.close()
