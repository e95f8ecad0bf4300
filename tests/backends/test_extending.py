"""A new engine is one Backend class plus its registry line: it then runs everywhere a backend
name is taken (benchmark matrices, `edgelmm serve --backend`), without edits to edgelmm."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from edgelmm import Backend, Counts, ModelSpec, Request, Result, SamplingParams, Timings, TokenEvent
from edgelmm.bench import bench_config_from_args, run_bench
from edgelmm.registry import BACKENDS


class Shouting(Backend):
    """Answers every request with its last user text in capitals: an engine in ten lines."""

    name = "shouting"

    def load(self, spec: ModelSpec) -> None:
        self.spec = spec

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        t0 = time.perf_counter()
        content = request.messages[-1]["content"] if request.messages else request.text
        text = (content if isinstance(content, str) else content[-1]["text"]).upper()[: params.max_new_tokens]
        yield TokenEvent(None, text, None, time.perf_counter() - t0)
        timings = Timings.from_stamps(t0, [time.perf_counter()], time.perf_counter())
        result = Result(text, [], None, timings, Counts(None, 0, len(text)), None, "length")
        yield TokenEvent(None, "", None, time.perf_counter() - t0, result=result)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        return self.generate_sequentially(requests, params)


@pytest.fixture
def shouting(monkeypatch):
    monkeypatch.setattr(BACKENDS, "_entries", dict(BACKENDS._entries))
    BACKENDS.register("shouting", Shouting)  # the registry line


def test_a_new_engine_runs_in_a_benchmark_matrix(shouting, tmp_path):
    config = bench_config_from_args("anything", backends="shouting", samples=2, device="cpu", max_new_tokens=64)
    [row] = run_bench(config.model_copy(update={"warmup": 0}), tmp_path, progress=False)
    assert row["backend"] == "shouting" and row["accuracy"] == 0.0 and row["counts"]["prompt_tokens"] is None


def test_a_new_engine_is_served(shouting):
    pytest.importorskip("fastapi")
    from edgelmm.serve import BackgroundServer, build

    app, engine = build(ModelSpec(path="anything"), backend="shouting", served_name="loud")
    try:
        with BackgroundServer(app) as server:
            answer = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
                "model": "loud", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}).json()
    finally:
        engine.close()
    assert answer["choices"][0]["message"]["content"] == "HELLO THERE"
