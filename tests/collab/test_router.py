"""The Router against real clouds on loopback: a healthy `edgelmm serve`, and servers that fail
(503, hanging, dropping the connection, refusing). Whatever the cloud does, one answer comes back."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgelmm.collab.client import CloudClient, CloudSettings
from edgelmm.collab.policy import Policy
from edgelmm.collab.router import Router
from edgelmm.config import SamplingParams
from edgelmm.demo.shapes import generate
from edgelmm.request import Request
from edgelmm.serve.engine import Engine
from tests.collab.conftest import MODEL, FaultyCloud

PARAMS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def edge(edge_backend):
    engine = Engine(edge_backend)
    yield engine
    engine.close()


def question(i: int = 0) -> Request:
    sample = generate(i + 1, seed=3)[i]
    return Request.chat(sample.question, [sample.image])


def answer(edge, url: str, policy: Policy, request: Request | None = None, **settings):
    async def run():
        async with CloudClient(CloudSettings(url, **settings)) as cloud:
            router = Router(policy, edge, cloud)
            return await router.answer(request or question(), PARAMS), router, cloud

    return asyncio.run(run())


def test_confident_answers_stay_on_the_edge_and_unsure_ones_go_up(edge, cloud_url):
    kept, router, _ = answer(edge, cloud_url, Policy(threshold=0.0))
    assert kept.served_by == "edge" and kept.cloud_s is None and 0 < kept.confidence <= 1
    assert kept.result.logprobs is None and kept.result.top_logprobs is None  # only what the user asked for
    sent, router, cloud = answer(edge, cloud_url, Policy(threshold=1.0))
    assert sent.served_by == "cloud" and sent.result.text == kept.result.text  # the same model on both sides
    assert sent.cloud_tokens == sent.result.counts.generated_tokens > 0 and sent.edge_tokens == kept.edge_tokens
    assert router.cloud_share() == 1.0 and cloud.model == MODEL  # the cloud's only model, learned at start
    info = sent.info()
    assert set(info) == {"served_by", "confidence", "reason", "edge_ms", "cloud_ms", "total_ms", "edge_tokens", "cloud_tokens"}


def test_modes(edge, cloud_url):
    assert answer(edge, cloud_url, Policy(mode="edge"))[0].served_by == "edge"
    assert answer(edge, cloud_url, Policy(mode="escalate", threshold=0.0))[0].served_by == "cloud"
    only = answer(edge, cloud_url, Policy(mode="cloud"))[0]
    assert only.served_by == "cloud" and only.edge_s is None


def test_early_decision_gives_the_same_answers(edge, cloud_url):
    whole = answer(edge, cloud_url, Policy(threshold=0.0))[0]
    early = answer(edge, cloud_url, Policy(threshold=0.0, early_k=1))[0]
    assert early.served_by == "edge" and early.result.token_ids == whole.result.token_ids
    sent = answer(edge, cloud_url, Policy(threshold=1.0, early_k=1))[0]
    assert sent.served_by == "cloud" and sent.result.text == whole.result.text


def test_token_id_prompts_stay_on_the_edge(edge, cloud_url):
    ids = edge.backend.prompt_token_ids(question())
    request = Request(token_ids=ids, images=question().all_images())
    routed = answer(edge, cloud_url, Policy(threshold=1.0), request)[0]
    assert routed.served_by == "edge" and "token-id prompt" in routed.reason


@pytest.mark.parametrize("mode, reason", [("status", "status_503"), ("drop", "unreachable")])
def test_a_failing_cloud_is_retried_then_the_edge_answers(edge, mode, reason):
    with FaultyCloud(mode) as faulty:
        routed = answer(edge, faulty.url, Policy(threshold=1.0), retries=2, backoff_s=0.01)[0]
        assert faulty.calls == 3  # the first try and two retries
    assert routed.served_by == "edge_fallback" and reason in routed.reason
    assert routed.result.text and routed.result.counts.generated_tokens > 0


def test_a_hanging_cloud_is_bounded_by_the_timeout(edge):
    with FaultyCloud("hang") as faulty:
        started = time.perf_counter()
        routed = answer(edge, faulty.url, Policy(threshold=1.0), timeout_s=0.5)[0]
        waited = time.perf_counter() - started
    assert routed.served_by == "edge_fallback" and "timeout" in routed.reason
    assert waited < 10  # the bound is 0.5 s plus the edge; far below the hour the server would hang


def test_a_refusal_fails_at_once_and_does_not_open_the_breaker(edge):
    with FaultyCloud("status", status=400) as faulty:
        routed, _, cloud = answer(edge, faulty.url, Policy(threshold=1.0), breaker_failures=1)
        assert faulty.calls == 1 and cloud.breaker.state == "closed"
    assert routed.served_by == "edge_fallback" and "refused" in routed.reason


def test_the_breaker_opens_stops_calling_and_probes_again(edge):
    async def run(url):
        async with CloudClient(CloudSettings(url, retries=0, breaker_failures=2, breaker_reset_s=0.3)) as cloud:
            router = Router(Policy(threshold=1.0), edge, cloud)
            first = [await router.answer(question(), PARAMS) for _ in range(3)]
            calls_when_open = faulty.calls
            await asyncio.sleep(0.35)
            probed = await router.answer(question(), PARAMS)  # half-open: /models answers, the call fails
            return first, calls_when_open, probed, cloud, router

    with FaultyCloud("status") as faulty:
        first, calls_when_open, probed, cloud, router = asyncio.run(run(faulty.url))
        assert calls_when_open == 2 and "breaker_open" in first[2].reason
        assert faulty.calls == 3 and cloud.breaker.state == "open" and cloud.breaker.opened == 2
    assert all(r.served_by == "edge_fallback" for r in [*first, probed])
    assert router.metrics.failures.values[("breaker_open",)] == 1


def test_the_breaker_closes_when_the_cloud_is_back(edge, cloud_url):
    async def run():
        async with CloudClient(CloudSettings(cloud_url, breaker_failures=1, breaker_reset_s=0.01)) as cloud:
            cloud.breaker.failure()
            assert cloud.breaker.state == "open"
            await asyncio.sleep(0.02)
            routed = await Router(Policy(threshold=1.0), edge, cloud).answer(question(), PARAMS)
            return routed, cloud

    routed, cloud = asyncio.run(run())
    assert routed.served_by == "cloud" and cloud.breaker.state == "closed"


def test_injected_delay_and_loss(edge, cloud_url):
    slow = answer(edge, cloud_url, Policy(threshold=1.0), rtt_ms=200)[0]
    assert slow.served_by == "cloud" and slow.cloud_s >= 0.2
    lost, _, cloud = answer(edge, cloud_url, Policy(threshold=1.0), loss=0.9, retries=0, fault_seed=1)
    assert lost.served_by == "edge_fallback" and "injected loss" in lost.reason
