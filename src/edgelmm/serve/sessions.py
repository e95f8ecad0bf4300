"""The native draft–verify protocol of `edgelmm serve`: verify sessions that keep their KV cache.

    POST /v1/edgelmm/verify
    {"model": M, "session": "s-1", "messages": [...],          # only to open (or re-open) it
     "keep": 0, "tokens": [d1, d2, d3], "top_logprobs": 1}
    -> {"session": "s-1", "opened": true, "scores": [[[id, logprob], ...], ...],
        "processed_tokens": 3, "prompt_tokens": 158, "batch": 1, "kept": true}

A session is one answer in progress: its prompt (rendered by this server's own chat template,
images included, so the client never needs this model's image tokens) and the generated tokens
both sides agree on. A round keeps the first `keep` generated tokens the session has read, reads
`tokens` after them, and answers the model's top-k after each of them (and, when the session
was just opened, after the prompt too): one forward pass over only the new tokens (an opening
round: the prompt and its tokens in one prefill). Rounds that arrive together, from many edge
clients, are read in one batched forward pass.

Sessions live in this process only, as an optimisation, never a source of truth: evicted (least
recently used first) when their KV exceeds the byte budget, gone after a restart. A round for a
session that is not here is answered 404 `session_not_found`, and the client opens it again
with its prompt and every agreed token. `{"probe": true}` answers what the protocol offers;
`{"session": S, "close": true}` forgets one.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from edgelmm.backends.base import Request
from edgelmm.backends.kvstate import top_of
from edgelmm.serve.errors import ApiError
from edgelmm.serve.metrics import Counter, Gauge

PROTOCOL = "edgelmm-verify"
VERSION = 1


@dataclass
class Round:
    session: str
    request: Request | None  # the prompt, when opening
    keep: int
    tokens: list[int]
    top: int


class VerifySessions:
    """Verify sessions over a torch backend's KV states (call `run` from the engine thread)."""

    def __init__(self, backend: Any, budget_bytes: int, max_sessions: int = 1024):
        self.backend, self.budget, self.max_sessions = backend, budget_bytes, max_sessions
        self.states: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.hits = Counter("edgelmm_verify_session_hits_total", "Verify rounds that found their session's cache.")
        self.misses = Counter("edgelmm_verify_session_misses_total", "Verify rounds whose session was not here (404).")
        self.opened = Counter("edgelmm_verify_sessions_opened_total", "Verify sessions opened (prompt prefilled).")
        self.evicted = Counter("edgelmm_verify_sessions_evicted_total", "Verify sessions evicted for the byte budget.")
        self.tokens = Counter("edgelmm_verify_tokens_total", "Tokens read by verify rounds (prompts included).")
        self.batches = Counter("edgelmm_verify_batches_total", "Forward passes that read verify rounds.")
        self.parts = (self.hits, self.misses, self.opened, self.evicted, self.tokens, self.batches,
                      Gauge("edgelmm_verify_sessions", "Verify sessions held.", lambda: len(self.states)),
                      Gauge("edgelmm_verify_session_bytes", "KV bytes held by verify sessions.", self.nbytes))

    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states.values())

    def close(self, session: str) -> bool:
        return self.states.pop(session, None) is not None

    def run(self, rounds: list[Round]) -> list[Any]:
        """Each round's answer (or the ApiError for it alone). Rounds that open their sessions are
        prefilled with their tokens together (`KVRunner.open_many`: one pass per prompt length);
        the others' new tokens are read together in one."""
        runner = self.backend.kv_runner()
        answers: list[Any] = [None] * len(rounds)
        live, states, ids, counts = [], [], [], []
        started = time.perf_counter()
        opening = [i for i, r in enumerate(rounds) if r.request is not None]
        if opening:
            opened = runner.open_many([rounds[i].request for i in opening], [rounds[i].tokens for i in opening])
            for i, done in zip(opening, opened):
                if isinstance(done, BaseException):
                    answers[i] = done
                    continue
                state, rows = done
                self.states[rounds[i].session] = state
                self.opened.inc()
                self.tokens.inc(len(state.ids))
                answers[i] = self._answer(rounds[i], rows, state, len(rounds[i].tokens), True, len(opening), started)
        for i, r in enumerate(rounds):
            if r.request is not None:
                continue
            try:
                state = self.states.get(r.session)
                if state is None:
                    self.misses.inc()
                    raise ApiError(404, f"verify session '{r.session}' is not open here (evicted, closed, or the server "
                                   "restarted)", code="session_not_found", param="session")
                self.hits.inc()
                read = len(state.ids) - state.prompt_tokens
                if r.keep > read:
                    raise ApiError(400, f"keep is {r.keep}, but session '{r.session}' has read {read} generated tokens",
                                   param="keep")
                if not r.tokens:
                    raise ApiError(400, "a verify round reads at least one token (or opens its session)", param="tokens")
                self.states.move_to_end(r.session)
                live.append(i)
                states.append(state)
                ids.append(state.ids[: state.prompt_tokens + r.keep] + r.tokens)
                counts.append(len(r.tokens))
            except Exception as exc:  # noqa: BLE001  (this round's error, answered to it alone)
                answers[i] = exc
        if live:
            self.batches.inc()
            for j, state, (rows, read) in zip(live, states, runner.tail_many(states, ids, counts)):
                self.tokens.inc(read)
                answers[j] = self._answer(rounds[j], rows, state, read, False, len(live), started)
        for i, r in enumerate(rounds):
            if isinstance(answers[i], dict):
                answers[i]["kept"] = self._fit(r.session)
        return answers

    @staticmethod
    def _answer(r: Round, rows: Any, state: Any, read: int, opened: bool, batch: int, started: float) -> dict[str, Any]:
        return {"session": r.session, "opened": opened, "scores": top_of(rows, r.top), "processed_tokens": read,
                "prompt_tokens": state.prompt_tokens if opened else 0, "batch": batch,
                "seconds": round(time.perf_counter() - started, 6)}

    def _fit(self, keep: str) -> bool:
        """Evict least recently used sessions until the budget holds; False when `keep` alone
        does not fit (it is dropped too: its next round re-opens it)."""
        while len(self.states) > self.max_sessions or (self.nbytes() > self.budget and len(self.states) > 1):
            oldest = next(iter(self.states))
            if oldest == keep:
                self.states.move_to_end(keep)
                oldest = next(iter(self.states))
            del self.states[oldest]
            self.evicted.inc()
        if keep in self.states and self.nbytes() > self.budget:
            del self.states[keep]
            self.evicted.inc()
            return False
        return keep in self.states
