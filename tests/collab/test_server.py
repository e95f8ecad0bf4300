"""`edgelmm collab serve` over real HTTP: the official openai client, the extension field, streams,
metrics, the API key, and a cloud that goes away while the edge keeps answering."""

from __future__ import annotations

import base64
import io

import httpx
import pytest

from edgelmm import ModelSpec
from edgelmm.collab.client import CloudSettings
from edgelmm.collab.policy import Policy
from edgelmm.collab.server import check_cloud, wrap
from edgelmm.demo.shapes import CAPTION_PROMPT, generate
from edgelmm.errors import EdgelmmError
from edgelmm.serve import BackgroundServer, build
from tests.collab.conftest import MODEL, FaultyCloud

openai = pytest.importorskip("openai")


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(i: int = 0, text: str | None = None) -> list[dict]:
    sample = generate(i + 1, seed=4)[i]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(sample.image)}},
                                         {"type": "text", "text": text or sample.question}]}]


def edge_server(cloud_url: str, policy: Policy, api_key: str | None = None, **settings) -> BackgroundServer:
    cloud = check_cloud(CloudSettings(cloud_url, **settings))
    app, engine = build(ModelSpec(path=MODEL, device="cpu"), api_key=api_key, wrap=wrap(policy, cloud))
    server = BackgroundServer(app)
    server.engine = engine
    return server


def client(server: BackgroundServer, key: str = "unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_answers_say_where_they_came_from(cloud_url):
    with edge_server(cloud_url, Policy(threshold=1.0)) as up, edge_server(cloud_url, Policy(threshold=0.0)) as kept:
        sent = client(up).chat.completions.create(model=MODEL, messages=messages(), max_tokens=8)
        local = client(kept).chat.completions.create(model=MODEL, messages=messages(), max_tokens=8)
        assert sent.model_extra["edgelmm"]["served_by"] == "cloud"
        assert local.model_extra["edgelmm"]["served_by"] == "edge"
        assert sent.choices[0].message.content == local.choices[0].message.content  # same model both sides
        health = httpx.get(up.url + "/health").json()
        assert health["cloud"]["breaker"] == "closed" and health["cloud_share"] == 1.0
        metrics = httpx.get(up.url + "/metrics").text
        assert 'edgelmm_collab_answers_total{served_by="cloud"} 1' in metrics
        assert "edgelmm_collab_breaker_state 0" in metrics
    for server in (up, kept):
        server.engine.close()


def test_streams_and_completions_are_routed(cloud_url):
    with edge_server(cloud_url, Policy(threshold=1.0)) as up:
        chunks = list(client(up).chat.completions.create(
            model=MODEL, messages=messages(0, "Describe the image."), max_tokens=64, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("a ") and chunks[-1].model_extra["edgelmm"]["served_by"] == "cloud"
        done = client(up).completions.create(model=MODEL, prompt="USER: Describe the image. ASSISTANT:", max_tokens=4)
        assert done.model_extra["edgelmm"][0]["served_by"] == "cloud"
    up.engine.close()


def test_the_api_key_guards_the_edge(cloud_url):
    with edge_server(cloud_url, Policy(), api_key="secret") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").chat.completions.create(model=MODEL, messages=messages(), max_tokens=4)
        assert client(server, "secret").chat.completions.create(model=MODEL, messages=messages(), max_tokens=4).choices
    server.engine.close()


def test_a_cloud_that_goes_away_leaves_flagged_edge_answers():
    with FaultyCloud("status") as faulty, edge_server(faulty.url, Policy(threshold=1.0), retries=0,
                                                      breaker_failures=2) as server:
        extras = [client(server).chat.completions.create(model=MODEL, messages=messages(i), max_tokens=8).model_extra["edgelmm"]
                  for i in range(4)]
        assert [e["served_by"] for e in extras] == ["edge_fallback"] * 4
        assert "breaker_open" in extras[-1]["reason"] and faulty.calls == 2
        metrics = httpx.get(server.url + "/metrics").text
        assert "edgelmm_collab_breaker_state 2" in metrics
        assert 'edgelmm_collab_cloud_failures_total{reason="status_503"} 2' in metrics
    server.engine.close()


def test_start_up_checks_of_the_cloud(cloud_url):
    from edgelmm.serve.server import free_port

    with pytest.raises(EdgelmmError, match="cannot reach the cloud"):
        check_cloud(CloudSettings(f"http://127.0.0.1:{free_port()}/v1", timeout_s=2))
    with pytest.raises(EdgelmmError, match="does not serve 'nope'.*it serves: shapes-vlm-s"):
        check_cloud(CloudSettings(cloud_url, model="nope"))
    with pytest.raises(EdgelmmError, match="answered 404"):  # not an API root
        check_cloud(CloudSettings(cloud_url.removesuffix("/v1") + "/nothing"))
    with pytest.raises(EdgelmmError, match="not an http"):
        CloudSettings("localhost:8000")


def test_draft_verify_through_collab_serve_and_the_openai_client(cloud_url, capsys):
    """`--policy draft-verify`: the cloud's own greedy answer, its statistics in the extension
    field; a routing policy escalating by draft-verify; and a cloud without a verify protocol
    leaves routing, with the line that says why."""
    cloud = openai.OpenAI(base_url=cloud_url, api_key="unused", max_retries=0, timeout=60)
    with edge_server(cloud_url, Policy(mode="draft_verify")) as dv, \
            edge_server(cloud_url, Policy(threshold=1.0, escalate_by="draft_verify")) as escalating:
        assert "native protocol" in capsys.readouterr().err
        for server in (dv, escalating):
            ours = client(server).chat.completions.create(model=MODEL, messages=messages(1), max_tokens=12, temperature=0)
            theirs = cloud.chat.completions.create(model=MODEL, messages=messages(1), max_tokens=12, temperature=0)
            info = ours.model_extra["edgelmm"]
            assert ours.choices[0].message.content == theirs.choices[0].message.content
            assert info["served_by"] == "draft_verify" and info["draft_verify"]["protocol"] == "native"
            assert info["draft_verify"]["rounds"] >= 1 and httpx.get(server.url + "/health").json()["cloud_share"] == 1.0
        assert info["confidence"] is not None  # the escalated one was routed first
    for server in (dv, escalating):
        server.engine.close()
    with FaultyCloud(status=404) as faulty, edge_server(faulty.url, Policy(mode="draft_verify"), retries=0) as routed:
        assert "routing only" in capsys.readouterr().err
        assert "draft_verify" not in httpx.get(routed.url + "/health").json()["policy"]
    routed.engine.close()


def test_a_draft_verify_stream_comes_round_by_round(cloud_url):
    with edge_server(cloud_url, Policy(mode="draft_verify", draft_length=2)) as server:
        chunks = list(client(server).chat.completions.create(model=MODEL, messages=messages(2, CAPTION_PROMPT),
                                                              max_tokens=24, temperature=0, stream=True))
        whole = client(server).chat.completions.create(model=MODEL, messages=messages(2, CAPTION_PROMPT),
                                                       max_tokens=24, temperature=0)
    server.engine.close()
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 2 and "".join(texts) == whole.choices[0].message.content
    assert chunks[-1].model_extra["edgelmm"]["served_by"] == "draft_verify"
