"""Draft–verify over HTTP: the two verify protocols, the probe that picks one, and the tokenizer check.

- **native** (`edgelmm serve`, POST /v1/edgelmm/verify, see serve/sessions.py): the cloud keeps
  a session's KV cache, so a round sends and reads only the tokens it adds (the cloud's last
  token and the new drafts); the prompt and its images go once, when the session opens. A
  session the cloud no longer has (evicted, restarted) is opened again with every agreed token.
- **generic** (any server whose /v1/completions takes token-id prompts and echoes their
  log-probabilities with the top-k, as vLLM does): each round sends the whole sequence — the
  cloud's own prompt ids (from its /tokenize), the agreed tokens and the drafts — with
  `echo`, `logprobs` and `max_tokens: 1`, and reads the drafts' top-k from the echoed prompt and
  the next token from the one generated. The server reads the whole sequence every round
  (vLLM's prefix caching saves the compute, not the tokens sent); `processed` reports it. Images
  ride along only where the server takes them on /v1/completions (`edgelmm serve` does, with
  its `images` field; vLLM's OpenAI API does not).

Every round carries `x-session-id: <the answer's session>`, so a load balancer in front of many
replicas can keep an answer on one of them (vLLM's production-stack router:
`--routing-logic session --session-key x-session-id`).

`probe` asks the cloud once which it supports; a cloud with neither (llama.cpp's server echoes
no prompt log-probabilities) is left to routing. Draft–verify also needs the edge and the cloud
to share a tokenizer: `check_tokenizer` compares their ids on a probe text through the cloud's
/tokenize.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from edgelmm.backends.kvstate import common_prefix
from edgelmm.backends.openai_backend import image_data_url, openai_messages
from edgelmm.collab.client import CloudClient, CloudError
from edgelmm.collab.policy import Policy
from edgelmm.collab.speculative import Dist, Verified, Verifier
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request

NATIVE, GENERIC = "native", "generic"
SESSION_HEADER = "x-session-id"
PROBE_TEXT = "Draft and verify: 3 red circles, 12 blue squares; ok? (yes/no) \u00e9t\u00e9 \u4e2d\u6587"


def _prompt_fields(request: Request) -> dict[str, Any]:
    """The request's prompt as a verify-open or tokenize body carries it."""
    if request.messages is not None:
        return {"messages": openai_messages(request)}
    fields: dict[str, Any] = {"prompt": request.text if request.text is not None else request.token_ids}
    if request.images:
        fields["images"] = [image_data_url(i) for i in request.images]
    return fields


def _dist(row: Any) -> Dist:
    return [(int(t), float(lp)) for t, lp in row]


class NativeVerifier(Verifier):
    protocol = NATIVE

    def __init__(self, cloud: CloudClient):
        self.cloud = cloud
        self.session = ""
        self.request: Request | None = None
        self.read: list[int] | None = None  # the generated tokens the cloud's session has read; None: not open

    async def open(self, request: Request) -> None:
        self.request, self.session, self.read = request, f"dv-{uuid.uuid4().hex}", None

    async def verify(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        try:
            return await self._round(agreed, drafts, top)
        except CloudError as exc:
            if exc.code != "session_not_found" or self.read is None:
                raise
            self.read = None  # the cloud lost the session: open it again with everything agreed
            return await self._round(agreed, drafts, top)

    async def _round(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        assert self.request is not None
        body: dict[str, Any] = {"model": self.cloud.model, "session": self.session, "top_logprobs": top}
        if self.read is None:
            body.update(_prompt_fields(self.request), keep=0, tokens=agreed + drafts)
        else:
            keep = common_prefix(self.read, agreed)
            body.update(keep=keep, tokens=agreed[keep:] + drafts)
        data = await self.cloud.call("/edgelmm/verify", body, lambda d: d, {SESSION_HEADER: self.session})
        scores = [_dist(row) for row in data["scores"]]
        if len(scores) < len(drafts) + 1:
            raise CloudError("bad_response", f"the verify round answered {len(scores)} positions, {len(drafts) + 1} needed")
        self.read = (agreed + drafts) if data.get("kept", True) else None
        return Verified(scores[-(len(drafts) + 1):], int(data["processed_tokens"]), 1, int(data.get("prompt_tokens", 0)))

    async def close(self) -> None:
        """Forget the session in the cloud, without waiting for it (an evicted one costs nothing)."""
        if self.read is not None:
            body = {"model": self.cloud.model, "session": self.session, "close": True}
            asyncio.ensure_future(_quietly(self.cloud.call("/edgelmm/verify", body, lambda d: d,
                                                           {SESSION_HEADER: self.session})))
        self.read = None


async def _quietly(call: Any) -> None:
    """A best-effort call: the cloud evicts what it is not told to forget, so a failure costs nothing."""
    try:
        await call
    except Exception:  # noqa: BLE001  (a closed pool, a cloud gone: nothing to do about it)
        pass


def _echoed(data: Any, n: int) -> list[Dist]:
    """The top-k of the last n positions of an echoed completion (prompt positions, then the generated one)."""
    tops = data["choices"][0]["logprobs"]["top_logprobs"][-n:]
    out = []
    for top in tops:
        if not isinstance(top, dict) or not top:
            raise CloudError("bad_response", "the cloud echoed no top log-probabilities for a drafted position")
        pairs = [(int(str(k).removeprefix("token_id:")), float(v)) for k, v in top.items()]
        out.append(sorted(pairs, key=lambda p: -p[1]))
    return out


class GenericVerifier(Verifier):
    protocol = GENERIC

    def __init__(self, cloud: CloudClient):
        self.cloud = cloud
        self.prompt: list[int] = []
        self.images: list[str] = []
        self.session = ""

    async def open(self, request: Request) -> None:
        self.session = f"dv-{uuid.uuid4().hex}"
        fields = _prompt_fields(request)
        self.images = fields.pop("images", [])
        if "prompt" in fields and isinstance(fields["prompt"], list):
            self.prompt = list(fields["prompt"])
            return
        body = {"model": self.cloud.model, **fields}
        if "prompt" in body:
            body["add_special_tokens"] = True
        self.prompt = await self.cloud.call("//tokenize", body, lambda d: [int(t) for t in d["tokens"]],
                                            {SESSION_HEADER: self.session})
        if request.messages is not None:
            self.images = [p["image_url"]["url"] for m in fields["messages"] if isinstance(m["content"], list)
                           for p in m["content"] if p.get("type") == "image_url"]

    async def verify(self, agreed: list[int], drafts: list[int], top: int) -> Verified:
        sequence = self.prompt + agreed + drafts
        body: dict[str, Any] = {"model": self.cloud.model, "prompt": sequence, "max_tokens": 1, "temperature": 0,
                                "logprobs": top, "echo": True, "return_tokens_as_token_ids": True}
        if self.images:
            body["images"] = self.images
        dists = await self.cloud.call("/completions", body, lambda d: _echoed(d, len(drafts) + 1),
                                      {SESSION_HEADER: self.session})
        return Verified(dists, len(sequence), 1)


async def probe(cloud: CloudClient) -> tuple[str | None, str]:
    """(the protocol to use, or None, and a line that says which and why)."""
    try:
        data = await cloud.call("/edgelmm/verify", {"probe": True}, lambda d: d)
        if data.get("protocol") == "edgelmm-verify" and data.get("available"):
            return NATIVE, "draft-verify: the cloud keeps verify sessions (native protocol)"
    except CloudError:
        pass
    body = {"model": cloud.model, "prompt": [1, 2], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "return_tokens_as_token_ids": True}
    try:
        await cloud.call("/completions", body, lambda d: _echoed(d, 2))
        return GENERIC, ("draft-verify: the cloud echoes prompt log-probabilities (generic protocol; it re-reads "
                         "the whole sequence every round)")
    except CloudError as exc:
        return None, (f"draft-verify is off: the cloud has neither edgelmm's verify route nor echoed prompt "
                      f"log-probabilities on /v1/completions ({exc}); routing only")


async def check_tokenizer(cloud: CloudClient, edge_ids: list[int]) -> str | None:
    """None when the cloud tokenizes PROBE_TEXT as the edge did (`edge_ids`), else why not."""
    body = {"model": cloud.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
    try:
        cloud_ids = await cloud.call("//tokenize", body, lambda d: [int(t) for t in d["tokens"]])
    except CloudError as exc:
        return f"the cloud's /tokenize did not answer ({exc}), so the tokenizers cannot be compared"
    if cloud_ids != edge_ids:
        at = common_prefix(cloud_ids, edge_ids)
        return (f"the edge and the cloud tokenize differently (a probe text gives {len(edge_ids)} and "
                f"{len(cloud_ids)} ids, apart from id {at})")
    return None


def verifier_for(protocol: str, cloud: CloudClient) -> Verifier:
    if protocol == NATIVE:
        return NativeVerifier(cloud)
    if protocol == GENERIC:
        return GenericVerifier(cloud)
    raise EdgelmmError(f"unknown verify protocol '{protocol}'", f"use {NATIVE} or {GENERIC}")


async def prepare(policy: Policy, cloud: CloudClient | None, edge_ids: Callable[[str], Awaitable[list[int]]],
                  edge_backend: Any = None) -> tuple[Policy, str | None, str | None]:
    """(the policy to run, the verify protocol, a line for the user) for a policy that verifies
    (mode draft_verify, or escalate_by draft_verify): the protocol the policy names or the probe
    finds, the edge's backend able to draft, and the tokenizers compared (`edge_ids` tokenizes a
    text as the edge does). Where
    draft-verify cannot run, the policy routes instead (escalated requests are completed by the
    cloud) and the line says why; other policies pass through."""
    if not policy.verifies:
        return policy, None, None
    if cloud is None:
        raise EdgelmmError("policy draft_verify needs a cloud", "give --cloud URL")
    if edge_backend is not None and not hasattr(edge_backend, "kv_runner"):
        protocol: str | None = None
        notice = (f"draft-verify is off: the edge's {edge_backend.name} backend keeps no KV state to draft from "
                  "(use --edge-backend torch); routing only")
    elif policy.protocol != "auto":
        protocol = policy.protocol
        notice = f"draft-verify: the {policy.protocol} protocol, as the policy says"
    else:
        protocol, notice = await probe(cloud)
    if protocol is not None:
        why = await check_tokenizer(cloud, await edge_ids(PROBE_TEXT))
        if why is not None:
            protocol, notice = None, f"draft-verify is off: {why}; routing only"
    if protocol is None:
        policy = policy.model_copy(update={"mode": "route" if policy.mode == "draft_verify" else policy.mode,
                                           "escalate_by": "complete"})
    else:
        policy = policy.model_copy(update={"protocol": protocol})
    return policy, protocol, notice
