"""Many clients at once on 127.0.0.1: no failures, every answer complete, and a client that goes
away frees its place. Request counts and times are bounded; every loop ends by itself."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgelmm import Backend
from edgelmm.serve import BackgroundServer
from edgelmm.serve.app import ServerConfig, create_app
from edgelmm.serve.engine import Engine
from tests.serve.conftest import MODEL, data_url

REQUESTS, CLIENTS = 200, 16


def one_request(url: str, i: int) -> tuple[str, int]:
    """(kind, tokens) after checking that the answer is complete; raises on anything else."""
    content = f"Question {i}: what color is the circle?"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": content}]
                 if i % 2 else content}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4 + i % 5, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as http:
        if i % 4 == 0:  # a quarter stream
            body.update(stream=True, stream_options={"include_usage": True})
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, response.read()
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            chunks = [json.loads(line) for line in lines[:-1]]
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
            return "stream", chunks[-1]["usage"]["completion_tokens"]
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= answer["usage"]["completion_tokens"] <= body["max_tokens"]
        return "whole", answer["usage"]["completion_tokens"]


def test_200_requests_from_16_clients(url, served):
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        outcomes = list(pool.map(lambda i: one_request(url, i), range(REQUESTS)))  # re-raises the first failure
    assert len(outcomes) == REQUESTS and all(tokens >= 1 for _, tokens in outcomes)
    assert {kind for kind, _ in outcomes} == {"stream", "whole"}
    assert time.monotonic() - start < 300
    engine = served[1]
    assert engine.queued == 0 and engine.running == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'edgelmm_requests_total{route="/v1/chat/completions",status="200"}' in metrics


def wait_idle(engine, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while (engine.running or engine.queued) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and engine.queued == 0


def test_a_client_leaving_mid_stream_frees_its_slot(url, served, caplog):
    engine = served[1]
    wait_idle(engine)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}
    with caplog.at_level(logging.INFO, logger="edgelmm.serve"):
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                next(response.iter_lines())  # the first chunk arrived: generation is under way
        wait_idle(engine)
    assert any("went away mid-stream" in r.message for r in caplog.records)
    after = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
    assert after.status_code == 200


class GatedBackend(Backend):
    """The torch backend behind a gate: generate waits until the test opens it, so "the engine is
    busy" lasts exactly as long as the test needs, whatever the machine's speed."""

    name = "gated"

    def __init__(self, inner: Backend):
        super().__init__()
        self.inner, self.gate, self.batches = inner, threading.Event(), []

    def load(self, spec):
        raise NotImplementedError

    def generate(self, requests, params):
        self.batches.append([r.messages[-1]["content"] for r in requests])
        assert self.gate.wait(30)
        return self.inner.generate(requests, params)

    def stream(self, request, params):
        return self.inner.stream(request, params)


def test_a_queued_client_that_leaves_is_skipped(served):
    backend = GatedBackend(served[1].backend)
    engine = Engine(backend)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as server:
        body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(httpx.post, server.url + "/v1/chat/completions", timeout=30,
                                json={**body, "messages": [{"role": "user", "content": "first"}]})
            while not backend.batches:  # the first request holds the engine
                time.sleep(0.01)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                           json={**body, "messages": [{"role": "user", "content": "leaver"}]})
            time.sleep(0.2)  # the server notices the disconnect
            backend.gate.set()
            assert first.result().status_code == 200
        wait_idle(engine)
        assert backend.batches == [["first"]]  # the leaver never reached the model
        assert 'edgelmm_request_errors_total{type="client_disconnected"} 1' in httpx.get(server.url + "/metrics").text
    engine.close()


def test_waiting_requests_run_as_one_batch(served):
    backend = GatedBackend(served[1].backend)
    engine = Engine(backend, max_batch_size=8)
    with BackgroundServer(create_app(engine, ServerConfig(MODEL))) as server:
        def ask(text: str, max_tokens: int = 2) -> httpx.Response:
            return httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
                "model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": text}]})

        with ThreadPoolExecutor(max_workers=5) as pool:
            first = pool.submit(ask, "first")
            while not backend.batches:
                time.sleep(0.01)
            waiting = [pool.submit(ask, t) for t in ("a", "b", "c")] + [pool.submit(ask, "other", 3)]
            while engine.queued < 4:
                time.sleep(0.01)
            backend.gate.set()
            assert all(f.result().status_code == 200 for f in [first, *waiting])
        # same settings share a batch; different max_tokens runs in a batch of its own
        assert backend.batches[0] == ["first"]
        assert sorted(sorted(b) for b in backend.batches[1:]) == [["a", "b", "c"], ["other"]]
    engine.close()
