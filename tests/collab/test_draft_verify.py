"""Draft–verify: greedy output token-identical to the cloud's own greedy decoding, in one process
and over HTTP through both protocols against a real `edgelmm serve`; speculative sampling keeps
the cloud's distribution; sessions the cloud lost are opened again; a cloud lost mid-answer
leaves the edge to finish; the protocol probe and the tokenizer check."""

import asyncio
import collections
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams
from edgelmm.backends.base import Timings
from edgelmm.backends.registry import load
from edgelmm.collab.client import CloudClient, CloudSettings
from edgelmm.collab.policy import Policy, load_policy
from edgelmm.collab.router import FALLBACK, Router
from edgelmm.collab.speculative import Drafter, DraftLength, LocalVerifier, accept, speculate, steady_token_s, warp
from edgelmm.collab.verify import GENERIC, NATIVE, GenericVerifier, NativeVerifier, prepare, probe
from edgelmm.serve.engine import Engine
from edgelmm.tasks import get_task
from tests.collab.conftest import FaultyCloud

CAPTION = SamplingParams(max_new_tokens=40, temperature=0)


@pytest.fixture(scope="module")
def drafter_backend():
    backend = load(ModelSpec(path="shapes-vlm-xs", device="cpu"))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def captions():
    return [Request.chat(s.prompt, images=s.images) for s in get_task("shapes-caption").samples(4, seed=5)]


def run(coro):
    return asyncio.run(coro)


def test_in_process_greedy_is_the_clouds_own_output(drafter_backend, edge_backend, captions):
    for request in captions:
        reference = edge_backend.generate([request], CAPTION)[0]
        out = run(speculate(request, CAPTION, Drafter(drafter_backend), LocalVerifier(edge_backend), DraftLength()))
        assert out.result.token_ids == reference.token_ids and out.result.text == reference.text
        stats = out.stats
        assert stats.rounds == stats.cloud_forward_passes == len(stats.draft_lengths)
        assert 0 <= stats.accepted <= stats.drafted and stats.rounds < len(reference.token_ids)
        # each round adds the cloud's token, but a last round that ends on an accepted draft
        assert stats.accepted + stats.rounds - 1 <= len(out.result.token_ids) <= stats.accepted + stats.rounds


@pytest.mark.parametrize("verifier", [NativeVerifier, GenericVerifier])
def test_over_http_greedy_is_the_clouds_own_output(drafter_backend, edge_backend, cloud_url, captions, verifier):
    async def go():
        async with CloudClient(CloudSettings(cloud_url)) as cloud:
            return [await speculate(r, CAPTION, Drafter(drafter_backend), verifier(cloud), DraftLength(fixed=4))
                    for r in captions]

    for request, out in zip(captions, run(go())):
        assert out.result.token_ids == edge_backend.generate([request], CAPTION)[0].token_ids
        assert out.stats.protocol == verifier.protocol
        if verifier is NativeVerifier:  # a round reads the cloud's last token and the drafts, no more
            rounds = [k + 1 for k in out.stats.draft_lengths]
            assert out.stats.cloud_tokens_processed <= sum(rounds) and out.stats.cloud_prompt_tokens > 0
        else:  # the whole sequence, every round
            assert out.stats.cloud_tokens_processed > out.stats.rounds * 100


def test_speculative_sampling_keeps_the_clouds_distribution():
    """The token a round yields first is distributed as the cloud's p, whatever the edge's q."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=4)
    cloud = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    dists = [list(zip(range(4), cloud.tolist())), list(zip(range(4), cloud.tolist()))]
    q = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # the edge's own, over a vocabulary of 5
    generator = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    for _ in range(20000):
        draft = int(torch.multinomial(q, 1, generator=generator))
        m, token = accept([draft], [q], dists, params, generator)
        counts[draft if m == 1 else token] += 1
    empirical = torch.tensor([counts[i] / 20000 for i in range(4)])
    assert torch.allclose(empirical, warp(cloud, params), atol=0.015)


def test_draft_lengths_must_be_positive():
    with pytest.raises(EdgelmmError, match="at least 1"):
        DraftLength(fixed=0)
    with pytest.raises(Exception, match="draft_length"):
        Policy(mode="draft_verify", draft_length=0)
    assert load_policy("draft-verify").mode == "draft_verify"


def test_adaptive_length_drafts_longer_when_rounds_are_dear():
    cheap, dear = DraftLength(), DraftLength()
    for _ in range(10):
        cheap.update(4, 3, 0.004, 0.001)
        dear.update(4, 3, 0.004, 0.2)
    assert dear.next() > cheap.next() >= 1


def test_a_session_the_cloud_lost_is_opened_again(drafter_backend, edge_backend, cloud_url, captions):
    async def go():
        async with CloudClient(CloudSettings(cloud_url)) as cloud:
            verifier = NativeVerifier(cloud)
            original = verifier._round
            rounds = 0

            async def losing(agreed, drafts, top):
                nonlocal rounds
                rounds += 1
                if rounds == 3:  # the cloud forgets the session between two rounds
                    body = {"session": verifier.session, "close": True}
                    assert (await cloud.call("/edgelmm/verify", body, lambda d: d))["closed"]
                return await original(agreed, drafts, top)

            verifier._round = losing
            return await speculate(captions[0], CAPTION, Drafter(drafter_backend), verifier, DraftLength(fixed=2))

    out = run(go())
    assert out.result.token_ids == edge_backend.generate([captions[0]], CAPTION)[0].token_ids
    assert out.stats.cloud_prompt_tokens > 0 and out.stats.rounds >= 3


class _DiesAfter:
    """A loopback proxy to the real cloud that forwards `n` POSTs and then drops every connection."""

    def __init__(self, target: str, n: int):
        owner, self.n, self.calls, self.sessions = self, n, 0, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else None
                if method == "POST":
                    owner.calls += 1
                    owner.sessions.append(self.headers.get("x-session-id"))
                    if owner.calls > owner.n:
                        self.close_connection = True
                        self.connection.close()
                        return
                answer = httpx.request(method, target + self.path, content=body,
                                       headers={"Content-Type": "application/json"}, timeout=30)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_GET(self):
                self._relay("GET")

            def do_POST(self):
                self._relay("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_the_cloud_lost_mid_answer_leaves_the_edge_to_finish(drafter_backend, cloud, captions):
    proxy = _DiesAfter(cloud.url, n=2)
    edge = Engine(drafter_backend)
    try:
        async def go():
            settings = CloudSettings(proxy.url, retries=0, timeout_s=5)
            async with CloudClient(settings) as client:
                router = Router(Policy(mode="draft_verify", draft_length=3), edge, client, NATIVE)
                return await router.answer(captions[0], CAPTION)

        routed = run(go())
    finally:
        edge.close()
        proxy.server.shutdown()
    assert routed.served_by == FALLBACK and "mid-answer" in routed.reason
    assert routed.draft["rounds"] == 2 and routed.result.token_ids  # the agreed tokens kept, the rest the edge's
    assert len(routed.result.token_ids) > routed.draft["accepted"] + routed.draft["rounds"]


def test_every_round_names_its_session_for_a_load_balancer(drafter_backend, cloud, captions):
    proxy = _DiesAfter(cloud.url, n=10**6)

    async def go():
        async with CloudClient(CloudSettings(proxy.url)) as client:
            for verifier in (GenericVerifier(client), GenericVerifier(client), NativeVerifier(client)):
                await speculate(captions[1], CAPTION, Drafter(drafter_backend), verifier, DraftLength(fixed=3))

    try:
        run(go())
    finally:
        proxy.server.shutdown()
    sessions = proxy.sessions  # /tokenize, every round, and the native session's close
    assert all(s is not None and s.startswith("dv-") for s in sessions) and len(set(sessions)) == 3


def test_the_probe_and_the_tokenizer_check(drafter_backend, cloud_url):
    async def edge_ids(text):
        return drafter_backend.tokenize(text, add_special_tokens=False)

    async def other_ids(text):
        return [1, 2, 3]

    async def go():
        async with CloudClient(CloudSettings(cloud_url)) as client:
            found = await probe(client)
            policy, protocol, _ = await prepare(Policy(mode="draft_verify"), client, edge_ids)
            refused = await prepare(Policy(mode="draft_verify"), client, other_ids)
            forced = await prepare(Policy(mode="draft_verify", protocol="generic"), client, edge_ids)
        with FaultyCloud(status=404) as faulty:
            async with CloudClient(CloudSettings(faulty.url, retries=0)) as client:
                neither = await prepare(Policy(mode="draft_verify"), client, edge_ids)
        return found, (policy, protocol), refused, forced, neither

    found, (policy, protocol), refused, forced, neither = run(go())
    assert found[0] == NATIVE and protocol == NATIVE and policy.mode == "draft_verify"
    assert refused[1] is None and refused[0].mode == "route" and "tokenize differently" in refused[2]
    assert forced[1] == GENERIC
    assert neither[1] is None and neither[0].mode == "route" and "routing only" in neither[2]


def test_the_verify_route_refuses_bad_rounds(cloud_url):
    def post(body):
        return httpx.post(cloud_url + "/edgelmm/verify", json=body, timeout=30)

    assert post({"probe": True}).json()["protocol"] == "edgelmm-verify"
    missing = post({"session": "nobody", "keep": 0, "tokens": [5]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
    opened = post({"session": "s1", "prompt": "a b c", "tokens": [5, 6]}).json()
    assert opened["opened"] and len(opened["scores"]) == 3
    assert post({"session": "s1", "keep": 9, "tokens": [5]}).status_code == 400
    assert post({"session": "s1", "keep": 1, "tokens": []}).status_code == 400
    assert post({"session": "s1", "keep": 2, "tokens": [7], "top_logprobs": 3}).json()["processed_tokens"] == 1
    assert json.loads(post({"session": "s1", "close": True}).text)["closed"]


def test_an_oversized_session_is_dropped_not_kept(tmp_path):
    from edgelmm.serve import BackgroundServer, Limits, build

    app, engine = build(ModelSpec(path="shapes-vlm-xs", device="cpu"), limits=Limits(verify_cache_bytes=1024))
    with BackgroundServer(app) as server:
        answer = httpx.post(server.url + "/v1/edgelmm/verify", json={"session": "big", "prompt": "a b c", "tokens": [5]},
                            timeout=30).json()
        again = httpx.post(server.url + "/v1/edgelmm/verify", json={"session": "big", "keep": 1, "tokens": [6]}, timeout=30)
    engine.close()
    assert answer["kept"] is False and again.status_code == 404


def test_rounds_from_many_sessions_are_read_together_and_answer_as_alone(edge_backend):
    from edgelmm.serve.sessions import Round, VerifySessions

    sessions = VerifySessions(edge_backend, budget_bytes=2**30)
    prompts = [Request(text=f"what is shown {i} ?") for i in range(4)]
    sessions.run([Round(f"s{i}", p, 0, [5, 6], 2) for i, p in enumerate(prompts)])
    together = sessions.run([Round(f"s{i}", None, 2, [7, 8, 9][: i + 1], 2) for i in range(4)])
    assert [a["batch"] for a in together] == [4] * 4 and sessions.batches.values[()] == 1
    for i, p in enumerate(prompts):
        sessions.run([Round(f"a{i}", p, 0, [5, 6], 2)])
        [alone] = sessions.run([Round(f"a{i}", None, 2, [7, 8, 9][: i + 1], 2)])
        assert [[t for t, _ in row] for row in alone["scores"]] == [[t for t, _ in row] for row in together[i]["scores"]]
        for got, want in zip(together[i]["scores"], alone["scores"]):
            assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(got, want))
    missing = sessions.run([Round("nobody", None, 0, [5], 1), Round("s0", None, 3, [1], 1)])
    assert [type(m).__name__ for m in missing] == ["ApiError", "dict"]  # one bad round does not sink the others


def test_the_engine_runs_waiting_grouped_calls_together(edge_backend):
    engine = Engine(edge_backend)
    gate = threading.Event()
    seen = []

    async def go():
        blocker = asyncio.ensure_future(engine.call(gate.wait))
        await asyncio.sleep(0.05)  # the engine thread is inside the blocker now
        grouped = [asyncio.ensure_future(engine.call_grouped("g", lambda items: seen.append(list(items)) or items, i))
                   for i in range(3)]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        return await asyncio.gather(*grouped)

    try:
        assert run(go()) == [0, 1, 2]
    finally:
        engine.close()
    assert seen == [[0, 1, 2]]


def test_drafting_is_chosen_only_while_it_measures_faster():
    def answer(*gaps):  # a first token, then the later ones `gaps` apart (0: in the same round)
        return Timings(0.05, list(gaps), 0.05 + sum(gaps))

    assert steady_token_s(answer(0.0, 0.0, 0.01, 0.0, 0.01)) == pytest.approx(0.02 / 3)  # 3 tokens after the first round
    assert steady_token_s(answer(0.0, 0.0)) is None  # everything in one round
    length = DraftLength()
    turns = []
    for _ in range(6):  # until each way is measured on three answers, they take turns
        drafted = length.drafts_pay()
        turns.append(drafted)
        if drafted:  # rounds behind a long round trip (the first one cold)
            length.observe(answer(0.0, 0.5 if not length.drafted_rates else 0.1, 0.0, 0.1), drafted=True)
        else:  # the cloud decodes a token in 2 ms
            length.observe(answer(0.002, 0.002, 0.002), drafted=False)
    assert turns == [True, False] * 3
    choices = [length.drafts_pay() for _ in range(31)]
    assert choices.count(True) == 2 and choices.count(False) == 29  # every 16th answer explores the other way
    for _ in range(5):  # the link got fast: the median of the last answers follows
        length.observe(answer(0.0, 0.0, 0.001), drafted=True)
    assert length.t_drafted == pytest.approx(0.001) and length.drafts_pay()


def _answer_on_a_slow_link(drafter_backend, settings: CloudSettings, request: Request):
    """One draft-verify answer through a Router that has measured drafting as slower than the
    cloud alone, and the texts it streamed."""
    edge = Engine(drafter_backend)
    shown = []

    async def go():
        async with CloudClient(settings) as client:
            router = Router(Policy(mode="draft_verify"), edge, client, NATIVE)
            router.length.drafted_rates.extend([0.5] * 3)
            router.length.cloud_rates.extend([0.001] * 3)
            router.length.answers = 1  # not an exploring turn
            return await router.answer(request, CAPTION, on_token=lambda e: shown.append(e.text))

    try:
        return run(go()), shown
    finally:
        edge.close()


def test_where_drafting_is_slower_the_cloud_streams_its_own_answer(drafter_backend, edge_backend, cloud_url, captions):
    routed, shown = _answer_on_a_slow_link(drafter_backend, CloudSettings(cloud_url), captions[2])
    assert routed.served_by == "cloud" and "decoded alone" in routed.reason and routed.draft is None
    assert routed.result.token_ids == edge_backend.generate([captions[2]], CAPTION)[0].token_ids
    assert len(shown) > 2 and "".join(shown) == routed.result.text


class _StreamCut:
    """A loopback proxy to the real cloud that relays the first `n` events of a streamed answer,
    then closes the connection (a cloud killed mid-stream)."""

    def __init__(self, target: str, n: int):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                answer = httpx.get(target + self.path, timeout=30)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                events = [line for line in httpx.post(target + self.path, content=body, timeout=60,
                                                      headers={"Content-Type": "application/json"}).text.split("\n\n")
                          if line.startswith("data:")]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for event in events[:n]:
                    self.wfile.write((event + "\n\n").encode())
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_a_cloud_stream_cut_mid_answer_is_finished_by_the_edge(drafter_backend, cloud, captions):
    proxy = _StreamCut(cloud.url, n=4)  # the role chunk and three tokens
    try:
        routed, shown = _answer_on_a_slow_link(drafter_backend, CloudSettings(proxy.url, retries=0, timeout_s=10),
                                               captions[3])
    finally:
        proxy.server.shutdown()
    assert routed.served_by == FALLBACK and "after 3 agreed tokens" in routed.reason
    assert "".join(shown) == routed.result.text  # nothing shown twice, nothing lost
    assert len(routed.result.token_ids) > 3
