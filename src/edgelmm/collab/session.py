"""An edge model and a cloud, opened together, and task samples run through a Router.

    async with Session(edge_spec, cloud) as session:
        rows = await session.run(samples, task, Policy(mode="edge"), params)

The cloud is a running OpenAI-compatible server (`CloudSpec.url`, or the `CloudSettings` that
`collab run`, `chat` and `calibrate` build from their flags), or an `edgelmm serve` that
the session starts on loopback in a process of its own (`CloudSpec.serve`, a model spec) and
stops again. Each row is
one sample: its score, where it was served, the confidence, times and tokens each side, and the
edge's token log-probabilities with their top alternatives (`positions`), from which any
strategy's routing curve can be computed afterwards (`calibrate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import model_validator

from edgelmm.collab.client import CloudClient, CloudSettings, httpx_module
from edgelmm.collab.policy import Policy
from edgelmm.collab.router import Routed, Router
from edgelmm.collab.verify import prepare
from edgelmm.config import ModelSpec, SamplingParams, Schema
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request
from edgelmm.serve.engine import Engine
from edgelmm.tasks import Task, TaskSample


class CloudSpec(Schema):
    """Where the cloud is: a server's API root (`url`, with `model` if it serves several), or a
    model that an embedded `edgelmm serve` serves on loopback for the run (`serve`)."""

    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    serve: ModelSpec | None = None
    backend: str = "torch"  # for `serve`
    timeout_s: float = 10.0

    @model_validator(mode="after")
    def _one_place(self) -> CloudSpec:
        if (self.url is None) == (self.serve is None):
            raise ValueError("give the cloud as exactly one of url (a running server) or serve (a model to serve)")
        return self


def _start_cloud(spec: ModelSpec, backend: str) -> tuple[subprocess.Popen, str]:
    """`edgelmm serve` for `spec` in a process of its own on a free loopback port, as a cloud is
    (a thread of this process would share its interpreter lock with the edge); (process, API root)."""
    from edgelmm.serve.server import free_port

    httpx = httpx_module()
    port = free_port()
    argv = [sys.executable, "-m", "edgelmm.cli", "serve", spec.path, "--backend", backend, "--port", str(port),
            "--device", spec.device, "--dtype", spec.dtype, "--served-model-name", spec.display_name]
    argv += [a for m in spec.methods for a in ("--method", str(m))]
    argv += [a for k, v in spec.options.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            error = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            raise EdgelmmError(f"the cloud ({spec.display_name}) did not start: {error[-1] if error else proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise EdgelmmError(f"the cloud ({spec.display_name}) did not answer on {url} within 300 s")


class Session:
    """The edge model in a serve Engine, and the cloud: a `CloudSpec` (started here if `serve`),
    or the client settings of a running one (`CloudSettings`, as the CLI builds them). The cloud
    is checked before the edge model loads, so that a wrong address fails in a second."""

    def __init__(self, edge: ModelSpec | None, cloud: CloudSpec | CloudSettings | None, edge_backend: str = "torch"):
        self.edge_spec, self.cloud_spec, self.edge_backend = edge, cloud, edge_backend
        self.edge: Engine | None = None
        self._settings: CloudSettings | None = cloud if isinstance(cloud, CloudSettings) else None
        self._server: Any = None
        self._clouds: dict[float, CloudClient] = {}
        self._edge_cache: Any = None  # the edge's prefix cache while it is switched off

    async def __aenter__(self) -> Session:
        from edgelmm.backends.registry import load

        spec = self.cloud_spec
        if isinstance(spec, CloudSpec):
            url = spec.url
            if spec.serve is not None:
                self._server, url = await asyncio.to_thread(_start_cloud, spec.serve, spec.backend)
            assert url is not None
            self._settings = CloudSettings(url, spec.model, spec.api_key, timeout_s=spec.timeout_s)
        if self._settings is not None:
            await self.cloud()
        if self.edge_spec is not None:
            self.edge = Engine(await asyncio.to_thread(load, self.edge_spec, self.edge_backend))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clouds.values():
            await client.aclose()
        if self.edge is not None:
            self.edge.close()
            self.edge.backend.close()
        if self._server is not None:
            self._server.terminate()
            await asyncio.to_thread(self._server.wait, 30)

    async def cloud(self, rtt_ms: float | None = None) -> CloudClient:
        """A started client to the cloud, with `rtt_ms` of injected delay (default: the settings'); one per delay."""
        if self._settings is None:
            raise EdgelmmError("this run has no cloud", "give one (cloud: {url: ...} or cloud: {serve: ...})")
        rtt = self._settings.rtt_ms if rtt_ms is None else rtt_ms
        if rtt not in self._clouds:
            client = CloudClient(dataclasses.replace(self._settings, rtt_ms=rtt))
            await client.start()
            self._clouds[rtt] = client
        return self._clouds[rtt]

    def edge_cache(self, on: bool) -> None:
        """Switch the edge's prefix cache (torch: options.prefix_cache_mb) on or off between runs."""
        backend = self.edge.backend if self.edge is not None else None
        if backend is None or not hasattr(backend, "prefix_cache"):
            return
        if on and self._edge_cache is not None:
            backend.prefix_cache, self._edge_cache = self._edge_cache, None
        elif not on and backend.prefix_cache is not None:
            self._edge_cache, backend.prefix_cache = backend.prefix_cache, None

    async def router(self, policy: Policy, rtt_ms: float | None = None) -> Router:
        """A Router with `policy`; the edge is there to fall back on even when the policy never asks it.
        A draft_verify policy that cannot run (no verify protocol, other tokenizers) is an error here."""
        cloud = await self.cloud(rtt_ms) if policy.mode != "edge" else None
        if not policy.verifies:
            return Router(policy, self.edge, cloud)
        edge = self.edge
        if edge is None:
            raise EdgelmmError("policy draft_verify needs an edge model to draft with")

        async def edge_ids(text: str) -> list[int]:
            return list(await edge.call(lambda: edge.backend.tokenize(text, add_special_tokens=False)))

        run, protocol, notice = await prepare(policy, cloud, edge_ids, edge.backend)
        if protocol is None:
            raise EdgelmmError(notice or "draft-verify cannot run with this cloud", "use another policy (route)")
        return Router(run, edge, cloud, protocol)

    async def run(self, samples: Sequence[TaskSample], task: Task, policy: Policy, params: SamplingParams,
                  rtt_ms: float | None = None, concurrency: int = 1, progress: Any = None) -> list[dict[str, Any]]:
        """Every sample through a Router with `policy`, `concurrency` at a time, in order."""
        router = await self.router(policy, rtt_ms)
        gate = asyncio.Semaphore(max(1, concurrency))
        # the edge's log-probabilities are kept in the rows, so that every strategy's curve can be computed later
        asked = policy.edge_params(params)

        async def one(sample: TaskSample) -> dict[str, Any]:
            async with gate:
                routed = await router.answer(Request.chat(sample.prompt, sample.images, id=sample.id), asked)
            if progress is not None:
                progress()
            return row(sample, routed, task)

        return list(await asyncio.gather(*(one(s) for s in samples)))


def row(sample: TaskSample, routed: Routed, task: Task) -> dict[str, Any]:
    result = routed.result
    positions = None
    if routed.served_by != "cloud" and result.logprobs is not None:
        tops = result.top_logprobs or [[]] * len(result.logprobs)
        positions = [[round(lp, 6), [[t, round(v, 6)] for t, v in top]] for lp, top in zip(result.logprobs, tops)]
    return {"id": sample.id, "kind": sample.kind, "reference": sample.reference, "prediction": result.text,
            "score": task.score(result.text, sample), **routed.info(), "finish_reason": result.finish_reason,
            "positions": positions}

