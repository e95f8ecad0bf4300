"""The OpenAI-compatible server over a tiny LLaVA: answers, streaming, log-probabilities, echo, and
every bad input answered with a 4xx OpenAI error object while the server keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from edgelmm import ModelSpec, Request, SamplingParams
from edgelmm.serve import BackgroundServer, build
from tests.serve.conftest import LIMITS, MODEL, data_url
from tests.tiny_models import make_image

openai = pytest.importorskip("openai")

QUESTION = "What color is the circle?"


def image_message(text: str = QUESTION, image=None) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text},
    ]}]


def teacher_forced(backend, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, straight from the model."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_with_image_matches_the_in_process_backend(client, served):
    engine = served[1]
    image = make_image(seed=7)
    response = client.chat.completions.create(
        model=MODEL, messages=image_message(image=image), max_tokens=6, temperature=0,
        extra_body={"return_token_ids": True},
    )
    [expected] = engine.backend.generate([Request(QUESTION, [image])], SamplingParams(max_new_tokens=6))
    choice = response.choices[0]
    assert choice.message.content == expected.text
    assert choice.model_extra["token_ids"] == expected.token_ids
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.counts.prompt_tokens > 16  # 16 image tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_equals_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=image_message(), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_and_top_logprobs(client, served):
    response = client.chat.completions.create(
        model=MODEL, messages=image_message(), max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the most likely token
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=5, temperature=0, logprobs=True)
    assert [e.logprob for e in plain.choices[0].logprobs.content] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    streamed = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=5, temperature=0,
                                              logprobs=True, stream=True)
    stream_lps = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert stream_lps == pytest.approx([e.logprob for e in entries], abs=1e-4)


def test_echo_gives_the_models_prompt_logprobs(client, served):
    """What draft-verify decoding asks a server: log-probabilities of given tokens."""
    backend = served[1].backend
    prompt = "How many squares are there in the image?"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    ids = choice.model_extra["prompt_token_ids"]
    assert ids == backend.adapter.tokenizer(prompt).input_ids  # raw text: no chat template
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(teacher_forced(backend, ids), abs=1e-4)
    assert len(logprobs.tokens) == len(ids) and logprobs.text_offset[0] == 0
    assert choice.text.endswith(prompt)

    # token ids in, the same scores out: no re-tokenization on the way
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs, abs=1e-5)


def test_echo_with_generation(client, served):
    backend = served[1].backend
    prompt = "What color is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    generated = choice.model_extra["token_ids"]
    ids = choice.model_extra["prompt_token_ids"] + generated
    assert len(choice.logprobs.token_logprobs) == len(ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(teacher_forced(backend, ids), abs=1e-4)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert choice.text.endswith(plain.choices[0].text) and prompt in choice.text


def test_completions_are_raw_text_and_stream(client, served):
    tokenizer = served[1].backend.adapter.tokenizer
    prompt = "Describe the picture in one sentence:"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_multi_turn_conversation_uses_the_template(client):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                     {"type": "image_url", "image_url": {"url": data_url()}}]},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    single = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=3, temperature=0)
    assert response.usage.prompt_tokens > single.usage.prompt_tokens


def test_sampling_with_a_seed_repeats(client):
    kwargs = dict(model=MODEL, messages=image_message(), max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first, second = (client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    assert first == second


# ---------------------------------------------------------------- bad input

CHAT = "/v1/chat/completions"


def chat_body(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **overrides}


def image_body(url: str) -> dict:
    return chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": "hi"}]}])


def noise_png(side: int) -> str:
    return data_url(make_image(side, side))


BAD = {
    "malformed json": (CHAT, b"{not json", 400),
    "not an object": (CHAT, b"[1, 2]", 400),
    "no messages": (CHAT, {"model": MODEL}, 400),
    "empty messages": (CHAT, chat_body(messages=[]), 400),
    "unknown role": (CHAT, chat_body(messages=[{"role": "robot", "content": "x"}]), 400),
    "unknown model": (CHAT, chat_body(model="gpt-5"), 404),
    "n=2": (CHAT, chat_body(n=2), 400),
    "tools": (CHAT, chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    "negative temperature": (CHAT, chat_body(temperature=-1), 400),
    "max_tokens over the limit": (CHAT, chat_body(max_tokens=LIMITS.max_tokens + 1), 400),
    "prompt over the context": (CHAT, chat_body(messages=[{"role": "user", "content": "circle " * 1200}]), 400),
    "image not base64": (CHAT, image_body("data:image/png;base64,@@@@"), 400),
    "image not an image": (CHAT, image_body("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400),
    "image data URL not base64-encoded": (CHAT, image_body("data:image/png,rawbytes"), 400),
    "image too many pixels": (CHAT, image_body(noise_png(600)), 413),
    "image too many bytes": (CHAT, image_body("data:image/png;base64," + "A" * (2 * 2**20)), 413),
    "too many images": (CHAT, chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}] * 3}]), 400),
    "remote image URL": (CHAT, image_body("http://127.0.0.1:9/cat.png"), 400),
    "local file not allowed": (CHAT, image_body("/etc/hostname"), 400),
    "completion without prompt": ("/v1/completions", {"model": MODEL}, 400),
    "max_tokens 0 without echo": ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400),
    "list of prompts": ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400),
    "logprobs over 20": ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error(url, case):
    path, body, status = BAD[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_oversized_body_is_refused_before_reading(url):
    big = b'{"model": "x", "pad": "' + b"x" * (LIMITS.max_body_bytes + 10) + b'"}'
    response = httpx.post(url + CHAT, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_unknown_route_and_method(url):
    assert httpx.get(url + "/v1/nope").json()["error"]["type"] == "not_found_error"
    assert httpx.get(url + CHAT).status_code == 405


def test_client_errors_are_typed_and_the_server_keeps_serving(client, url):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "square " * 1200}], max_tokens=4)
    still = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=2)
    assert still.choices[0].message.content is not None
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_count_requests_errors_tokens_and_times(client, url):
    client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=3)
    httpx.post(url + CHAT, content=b"{", headers={"content-type": "application/json"})
    text = httpx.get(url + "/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    assert samples['edgelmm_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert samples['edgelmm_requests_total{route="/v1/chat/completions",status="400"}'] >= 1
    assert samples['edgelmm_request_errors_total{type="invalid_request_error"}'] >= 1
    assert samples["edgelmm_prompt_tokens_total"] > 0 and samples["edgelmm_generation_tokens_total"] > 0
    for histogram in ("edgelmm_time_to_first_token_seconds", "edgelmm_request_latency_seconds"):
        buckets = [v for k, v in samples.items() if k.startswith(histogram + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == samples[histogram + "_count"] >= 1
    assert "edgelmm_requests_waiting" in samples and "edgelmm_requests_running" in samples


# ---------------------------------------------------------------- API key and local files


@pytest.fixture(scope="module")
def guarded(tiny_llava_path):
    app, engine = build(ModelSpec(path=str(tiny_llava_path), device="cpu"), api_key="s3cret", allow_local_files=True,
                        limits=LIMITS, served_name=MODEL)
    with BackgroundServer(app) as server:
        yield server.url
    engine.close()


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT), ("POST", "/v1/completions")])
def test_api_key_is_enforced_on_every_route_but_health(guarded, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        response = httpx.request(method, guarded + path, headers=headers, json=chat_body())
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded + "/health").status_code == 200
    ok = httpx.get(guarded + "/v1/models", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_official_client_with_key_and_local_file(guarded, tmp_path):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    path = tmp_path / "shape.png"
    make_image(seed=3).save(path)
    client = openai.OpenAI(base_url=guarded + "/v1", api_key="s3cret", max_retries=0)
    for url in (str(path), path.as_uri()):
        response = client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        )
        assert response.usage.prompt_tokens > 16
