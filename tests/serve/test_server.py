"""The OpenAI-compatible server over a tiny LLaVA: answers, streaming, log-probabilities, echo, and
every bad input answered with a 4xx OpenAI error object while the server keeps serving."""

from __future__ import annotations

import base64
import os
import socket
import time

import httpx
import pytest
import torch

from edgelmm import ModelSpec, Request, SamplingParams
from edgelmm.serve import BackgroundServer, Limits, build
from edgelmm.serve.server import free_port
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
    [expected] = engine.backend.generate([Request.chat(QUESTION, [image])], SamplingParams(max_new_tokens=6))
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
    "logprobs over 20": ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400),
    "an empty stop string": (CHAT, chat_body(stop=[""]), 400),
    "seed of 2^64": (CHAT, chat_body(seed=2**64), 400),
    "a literal image placeholder in user text": (CHAT, chat_body(messages=[{"role": "user", "content": "what is <image> here?"}]), 400),
    "image tokens in token ids without images": ("/v1/completions", {"model": MODEL, "prompt": [1, 323, 5]}, 400),
    "token ids outside the vocabulary": ("/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400),
    "images without a placeholder": ("/v1/completions", {"model": MODEL, "prompt": "hi", "images": [data_url()]}, 400),
    "images with several prompts": ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "images": [data_url()]}, 400),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error(url, case):
    path, body, status = BAD[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_only_json_bodies_are_read(url):
    """A web page can post a form to a local server without asking; only JSON is accepted."""
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        response = httpx.post(url + CHAT, content=b'{"model": "x"}', headers=headers)
        assert response.status_code == 415 and response.json()["error"]["type"] == "invalid_request_error"


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
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def guarded(tiny_llava_path, media):
    app, engine = build(ModelSpec(path=str(tiny_llava_path), device="cpu"), api_key="s3cret", local_media_dir=media,
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


def test_official_client_with_key_and_local_file(guarded, media):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    path = media / "shape.png"
    make_image(seed=3).save(path)
    client = openai.OpenAI(base_url=guarded + "/v1", api_key="s3cret", max_retries=0)
    for url in (str(path), path.as_uri()):
        response = client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        )
        assert response.usage.prompt_tokens > 16


def test_local_images_only_from_the_allowed_folder_and_nothing_leaks(guarded, media, tmp_path):
    """Missing, unreadable, outside the folder, or a symlink out of it: one answer, so that a client
    cannot probe which files exist."""
    outside = tmp_path / "secret.png"
    make_image().save(outside)
    unreadable = media / "locked.png"
    make_image().save(unreadable)
    unreadable.chmod(0)
    (media / "link.png").symlink_to(outside)
    headers = {"authorization": "Bearer s3cret", "content-type": "application/json"}
    answers = set()
    for url in (str(outside), str(media / "missing.png"), str(media / "link.png"), str(media / ".." / outside.name),
                str(unreadable) if os.geteuid() != 0 else str(media / "nope.png"), "/etc/hostname"):
        response = httpx.post(guarded + CHAT, headers=headers, json=image_body(url))
        assert response.status_code == 400
        answers.add(response.json()["error"]["message"].replace(url, "URL"))
    assert len(answers) == 1 and "not available" in answers.pop()


@pytest.fixture(scope="module")
def strict(tiny_llava_path):
    limits = Limits(max_connections=3, body_timeout_s=2.0, max_tokens=8)
    app, engine = build(ModelSpec(path=str(tiny_llava_path), device="cpu"), limits=limits, served_name=MODEL)
    with BackgroundServer(app) as server:
        yield server
    engine.close()


def partial_upload(server, declared: int = 1000) -> socket.socket:
    conn = socket.create_connection((server.host, server.port))
    conn.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n{{\"model\": ".encode())
    return conn


def samples_of(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def test_a_stalled_upload_is_timed_out(strict):
    conn = partial_upload(strict)
    reply = b""
    try:
        conn.settimeout(10)
        while b"stalled" not in reply:  # the headers and the body may come in separate segments
            part = conn.recv(4096)
            if not part:
                break
            reply += part
    finally:
        conn.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply


def test_clients_that_hang_up_while_uploading_are_client_errors(served):
    server = served[0]
    gone = 'edgelmm_request_errors_total{type="client_disconnected"}'
    server_errors = 'edgelmm_request_errors_total{type="server_error"}'
    before = samples_of(server.url)
    for _ in range(20):
        conn = partial_upload(server)
        time.sleep(0.02)  # the server is reading the body when the client goes
        conn.close()
    deadline = time.monotonic() + 10
    while samples_of(server.url).get(gone, 0) < before.get(gone, 0) + 20:
        assert time.monotonic() < deadline, samples_of(server.url)
        time.sleep(0.05)
    assert samples_of(server.url).get(server_errors, 0) == before.get(server_errors, 0)
    assert httpx.post(server.url + CHAT, json=chat_body()).status_code == 200


def test_connections_are_bounded(strict, monkeypatch):
    """The bound is uvicorn's own `limit_concurrency` (it answers 503 past it): both ways of
    starting the server hand it `max_connections`."""
    from edgelmm.serve import server as serving

    assert strict.server.config.limit_concurrency == 3 and strict.server.config.timeout_keep_alive == 5
    seen = {}
    monkeypatch.setattr(serving, "_uvicorn", lambda: type("U", (), {"run": staticmethod(lambda app, **kw: seen.update(kw))}))
    monkeypatch.setattr(serving, "build", lambda *a, **k: (None, type("E", (), {"close": lambda self: None,
                                                                            "backend": type("B", (), {"close": lambda self: None})()})()))
    serving.run_server(ModelSpec(path="x"), port=free_port(), limits=Limits(max_connections=7))
    assert seen["limit_concurrency"] == 7 and seen["access_log"] is True
    serving.run_server(ModelSpec(path="x"), port=free_port(), access_log=False)
    assert seen["access_log"] is False


def test_the_access_log_can_be_turned_off():
    from edgelmm.cli import build_parser

    for command in (["serve", "m"], ["collab", "serve", "--edge", "m"]):
        assert build_parser().parse_args(command).access_log is True
        assert build_parser().parse_args(command + ["--no-access-log"]).access_log is False


# ---------------------------------------------------------------- what real clients rely on


def test_a_list_of_prompts_is_answered_in_order(client, served):
    """lm-eval's batch_size > 1: several prompts in one /v1/completions request."""
    backend = served[1].backend
    prompts = ["What color is", "How many squares", "Describe the picture"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, response.choices):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0).choices[0]
        assert choice.text == alone.text
    assert response.usage.prompt_tokens == sum(len(backend.adapter.tokenizer(p).input_ids) for p in prompts)
    streamed = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in response.choices]


def test_token_id_prompts_are_used_as_given_and_ids_come_back(client, served):
    backend = served[1].backend
    ids = backend.adapter.tokenizer("What color is the circle?").input_ids
    ids_of_text = client.completions.create(model=MODEL, prompt="What color is the circle?", max_tokens=4, temperature=0,
                                            extra_body={"return_token_ids": True}).choices[0]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                       extra_body={"return_token_ids": True}).choices[0]
    assert by_ids.model_extra["prompt_token_ids"] == ids == ids_of_text.model_extra["prompt_token_ids"]  # no echo needed
    assert by_ids.model_extra["token_ids"] == ids_of_text.model_extra["token_ids"]
    odd = [ids[0], *reversed(ids[1:])]  # not what the tokenizer would make of its own text
    choice = client.completions.create(model=MODEL, prompt=odd, max_tokens=0, echo=True, logprobs=0,
                                       extra_body={"return_token_ids": True}).choices[0]
    assert choice.model_extra["prompt_token_ids"] == odd


def test_many_stop_strings(client):
    """lm-eval adds the end-of-sequence string to a task's four stop strings."""
    stops = ["\n\n", "Question:", "</s>", "<|im_end|>", "Q:", "###"]
    response = client.completions.create(model=MODEL, prompt="What color is", max_tokens=4, temperature=0, stop=stops)
    assert response.choices[0].finish_reason in ("stop", "length")


def eos_biased(backend):
    """Make the end token the tiny model's first choice (a hook on lm_head); undo with .remove()."""
    eos = backend.adapter.eos_token_ids()[0]
    bias = torch.zeros(backend.adapter.lm_head().out_features)
    bias[eos] = 1e4
    return eos, backend.adapter.lm_head().register_forward_hook(lambda module, args, out: out + bias)


def test_the_end_token_is_kept_in_ids_logprobs_and_usage(client, served):
    """As vLLM: lm-eval's loglikelihood asks max_tokens 1 with echo and drops the last entry, which
    must be the generated token even when that is the end token."""
    backend = served[1].backend
    prompt = "What color is the circle?"
    eos, hook = eos_biased(backend)
    try:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                             logprobs=1, extra_body={"return_token_ids": True})
        chat = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=4, temperature=0,
                                              logprobs=True, extra_body={"return_token_ids": True})
        chunks = list(client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=4, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    finally:
        hook.remove()
    choice = response.choices[0]
    n = len(backend.adapter.tokenizer(prompt).input_ids)
    assert choice.model_extra["token_ids"] == [eos] and response.usage.completion_tokens == 1
    assert len(choice.logprobs.token_logprobs) == n + 1 and choice.text == prompt
    assert choice.finish_reason == "stop"
    message = chat.choices[0]
    assert message.message.content == "" and message.finish_reason == "stop"
    assert message.model_extra["token_ids"] == [eos] and len(message.logprobs.content) == 1
    assert chat.usage.completion_tokens == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"] and chunks[-1].usage.completion_tokens == 1


def test_stream_and_whole_answer_agree_in_every_field(client, served):
    kwargs = dict(model=MODEL, messages=image_message(), max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"return_token_ids": True})
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert [t for c in chunks for t in c.choices[0].model_extra.get("token_ids") or []] == whole.model_extra["token_ids"]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.logprobs.content], abs=1e-4)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.finish_reason]


def test_a_stop_string_is_never_streamed(client):
    base = dict(model=MODEL, prompt="Describe the picture in one sentence:", max_tokens=10, temperature=0)
    text = client.completions.create(**base).choices[0].text
    if len(text) < 4:
        pytest.skip("the tiny model says too little to cut")
    stop = text[2:4]
    whole = client.completions.create(**base, stop=[stop]).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, stop=[stop], stream=True) if c.choices)
    assert whole.text == streamed == text[: text.index(stop)] and whole.finish_reason == "stop"


def test_prompt_logprobs_on_chat_and_ids_as_token_names(client, served):
    """vLLM's extensions: chat prompt_logprobs, and tokens named 'token_id:N' for clients without the tokenizer."""
    backend = served[1].backend
    response = client.chat.completions.create(model=MODEL, messages=image_message(), max_tokens=2, temperature=0,
                                              logprobs=True, top_logprobs=2,
                                              extra_body={"prompt_logprobs": 1, "return_tokens_as_token_ids": True,
                                                          "return_token_ids": True})
    choice = response.choices[0]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    scores = response.model_extra["prompt_logprobs"]
    assert len(scores) == len(prompt_ids) and scores[0] is None
    assert all(str(t) in entry for t, entry in zip(prompt_ids[1:], scores[1:]))
    assert [e.token for e in choice.logprobs.content] == [f"token_id:{t}" for t in choice.model_extra["token_ids"]]
    [here] = backend.generate([Request(token_ids=prompt_ids, images=[make_image()])],
                              SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    got = [entry[str(t)]["logprob"] for t, entry in zip(prompt_ids[1:], scores[1:])]
    assert got == pytest.approx([s.logprob for s in here.prompt_logprobs[1:]], abs=1e-4)


def test_tokenizer_routes_as_vllm_has_them(url, served):
    backend = served[1].backend
    text = "What color is the circle?"
    ids = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert ids["tokens"] == backend.adapter.tokenizer(text).input_ids and ids["count"] == len(ids["tokens"])
    bare = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == backend.adapter.tokenizer(text, add_special_tokens=False).input_ids
    chat = httpx.post(url + "/tokenize", json={"messages": image_message()}).json()["tokens"]
    assert chat == backend.prompt_token_ids(Request.chat(QUESTION, [make_image()]))
    assert httpx.post(url + "/detokenize", json={"tokens": bare}).json()["prompt"] == text
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == backend.adapter.tokenizer.eos_token and "ASSISTANT" in info["chat_template"]
    assert httpx.post(url + "/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
