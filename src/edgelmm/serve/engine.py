"""One thread owns the model; HTTP handlers hand it jobs and await the answers.

Why one thread: a model on a small device has one set of weights and, on a CPU, cores that a
second concurrent forward pass would only fight over; tokenizers are not safe to share across
threads either. Jobs wait in a bounded queue (a full queue is answered at once, not after a
time-out). Waiting non-streaming jobs with the same settings are run as one batch through
`Backend.generate`, so throughput grows with load where the backend batches. A streaming job
runs alone through `Backend.stream`; a job whose client went away is skipped before it starts
and stopped between two tokens while it streams, which frees its slot.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgelmm.backends.base import Backend, Request, Result, TokenEvent
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.serve.text import TextAccess, TokenScore, text_access

log = logging.getLogger("edgelmm.serve")


class ApiError(Exception):
    """An error the client caused or must hear about, with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Prompt:
    """What a client asked for, before the engine thread turns it into model input.

    `messages` (HF message format) for chat, else `text` (raw model text or token ids).
    """

    images: list[Any]
    messages: list[dict[str, Any]] | None = None
    text: str | list[int] | None = None


@dataclass
class Completion:
    result: Result | None  # None when only the prompt was scored (echo with max_tokens 0)
    prompt_ids: list[int] | None = None
    prompt_text: str | None = None  # echo: the prompt as the model read it (special tokens included)
    prompt_scores: list[TokenScore] | None = None  # echo: one per prompt token
    scores: list[TokenScore] | None = None  # logprobs: one per generated token
    queued_s: float = 0.0  # time spent waiting for the engine


@dataclass
class StreamItem:
    event: TokenEvent
    token_text: str | None  # the token as text, for logprobs (None: not a model token)


@dataclass
class _Job:
    prompt: Prompt
    params: SamplingParams
    explicit_max_tokens: bool
    stream: bool
    top: int = 0  # top_logprobs wanted per generated token
    echo: bool = False
    generate: bool = True  # False: score the prompt only (echo with max_tokens 0)
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    queue: asyncio.Queue | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def batchable(self) -> bool:
        """Plain generation whose answer does not depend on what else is in the batch."""
        return self.generate and not (self.stream or self.top or self.echo) and (self.params.greedy or self.params.seed is None)

    def batch_key(self) -> tuple[Any, ...]:
        return (self.params.model_dump_json(), self.prompt.messages is None)


class Stream:
    """An open streaming job: async-iterate for StreamItems (the last has event.result set);
    cancel() stops it, queued or mid-generation. An error arrives as the raised ApiError."""

    def __init__(self, job: _Job):
        self._job = job
        self._done = False

    def cancel(self) -> None:
        self._job.cancelled = True

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> StreamItem:
        if self._done:
            raise StopAsyncIteration
        item = await self._job.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.event.result is not None
        return item


class Engine:
    def __init__(self, backend: Backend, max_batch_size: int = 8, max_queue: int = 256, max_context: int | None = None):
        self.backend = backend
        self.text: TextAccess | None = text_access(backend)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_context = max_context or (self.text.max_context if self.text else None)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.running = 0  # jobs in the model right now
        self._thread = threading.Thread(target=self._loop, name="edgelmm-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ async side
    def _submit(self, job: _Job) -> None:
        with self._ready:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", "server_error")
            if len(self._jobs) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {len(self._jobs)} requests are waiting, try again shortly",
                               "server_overloaded")
            self._jobs.append(job)
            self._ready.notify()

    async def complete(self, prompt: Prompt, params: SamplingParams, explicit_max_tokens: bool = True,
                       top: int = 0, echo: bool = False, generate: bool = True) -> Completion:
        """Run one request to its end; with generate=False only the prompt is scored (for echo)."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, params, explicit_max_tokens, stream=False, top=top, echo=echo, generate=generate,
                   loop=loop, future=loop.create_future())
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True  # no-op once done; stops a queued job whose handler was cancelled

    def open_stream(self, prompt: Prompt, params: SamplingParams, explicit_max_tokens: bool = True) -> Stream:
        """Queue a streaming job; iterate the Stream for its tokens. Call from the event loop."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, params, explicit_max_tokens, stream=True, loop=loop, queue=asyncio.Queue())
        self._submit(job)
        return Stream(job)

    # ------------------------------------------------------------ engine thread
    def _next(self) -> list[_Job] | None:
        """The oldest live job, plus waiting jobs that can share its batch (others keep their place)."""
        with self._ready:
            while True:
                while self._jobs and self._jobs[0].cancelled:
                    self._jobs.popleft()
                if self._jobs:
                    break
                if self._stopping:
                    return None
                self._ready.wait()
            first = self._jobs.popleft()
            batch = [first]
            if first.batchable:
                key, kept = first.batch_key(), collections.deque()
                while self._jobs and len(batch) < self.max_batch_size:
                    job = self._jobs.popleft()
                    if job.cancelled:
                        continue
                    (batch if job.batchable and job.batch_key() == key else kept).append(job)
                self._jobs.extendleft(reversed(kept))
            return batch

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            self.running = len(batch)
            try:
                if batch[0].stream:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            finally:
                self.running = 0

    @staticmethod
    def _deliver(job: _Job, value: Any) -> None:
        def settle() -> None:
            if job.future is not None and not job.future.done():
                if isinstance(value, BaseException):
                    job.future.set_exception(value)
                else:
                    job.future.set_result(value)
            elif job.queue is not None:
                job.queue.put_nowait(value)

        job.loop.call_soon_threadsafe(settle)

    @staticmethod
    def _as_api_error(exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, EdgelmmError):
            return ApiError(400, str(exc))
        log.exception("request failed inside the engine")
        return ApiError(500, f"internal error in the engine ({type(exc).__name__}); the server keeps serving", "server_error")

    def _prepare(self, job: _Job) -> tuple[Backend, Request, bool, SamplingParams]:
        """(backend view, request, raw, params): template or raw path, then the context limit."""
        prompt, text = job.prompt, self.text
        messages = prompt.messages
        if messages is not None and len(messages) == 1 and messages[0]["role"] == "user":
            parts = messages[0]["content"]
            words = parts if isinstance(parts, str) else "\n".join(p["text"] for p in parts if p["type"] == "text")
            request, raw = Request(words, list(prompt.images)), False
        elif text is None:
            what = "conversations other than one user message" if messages is not None else "/v1/completions"
            raise ApiError(400, f"the '{self.backend.name}' backend serves only chat with one user message, not {what}")
        elif messages is not None:
            request, raw = Request(text.render_chat(messages), list(prompt.images)), True
        else:
            words = prompt.text if isinstance(prompt.text, str) else text.decode(prompt.text)
            request, raw = Request(words, list(prompt.images)), True
        params = job.params
        if text is not None and self.max_context:
            n = len(prompt.text) if isinstance(prompt.text, list) else len(text.prompt_ids(request, raw))
            room = self.max_context - n
            if room < (params.max_new_tokens if job.explicit_max_tokens else 1):
                raise ApiError(
                    400, f"this model's context is {self.max_context} tokens, but the prompt has {n} and "
                    f"{params.max_new_tokens} more were asked for; shorten the prompt or lower max_tokens",
                    code="context_length_exceeded",
                )
            if not job.explicit_max_tokens:
                params = params.model_copy(update={"max_new_tokens": min(params.max_new_tokens, room)})
        backend = text.raw_backend() if raw else self.backend
        return backend, request, raw, params

    def _run_batch(self, batch: list[_Job]) -> None:
        """Prepare each job, then run those that ended up with the same backend view and settings
        (a conversation may need the raw view, a short context a smaller max_tokens) together."""
        groups: dict[tuple[int, str], list[tuple[_Job, Backend, Request, bool, SamplingParams]]] = {}
        for job in batch:
            try:
                backend, request, raw, params = self._prepare(job)
            except BaseException as exc:
                self._deliver(job, self._as_api_error(exc))
                continue
            groups.setdefault((id(backend), params.model_dump_json()), []).append((job, backend, request, raw, params))
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, group: list[tuple[_Job, Backend, Request, bool, SamplingParams]]) -> None:
        started = time.perf_counter()
        try:
            if group[0][0].echo or group[0][0].top:  # such jobs are never batched: a group of one
                completions = [self._scored(*group[0])]
            else:
                backend, params = group[0][1], group[0][4]
                results = backend.generate([request for _, _, request, _, _ in group], params)
                completions = [self._plain(job, result) for (job, *_), result in zip(group, results)]
        except BaseException as exc:
            error = self._as_api_error(exc)
            for job, *_ in group:
                self._deliver(job, error)
            return
        for (job, *_), completion in zip(group, completions):
            completion.queued_s = started - job.enqueued
            self._deliver(job, completion)

    def _plain(self, job: _Job, result: Result) -> Completion:
        scores = None
        if job.params.logprobs and result.logprobs is not None:
            texts = self.text.token_texts(result.token_ids) if self.text else [""] * len(result.token_ids)
            scores = [TokenScore(t, s, lp) for t, s, lp in zip(result.token_ids, texts, result.logprobs)]
        return Completion(result, scores=scores)

    def _scored(self, job: _Job, backend: Backend, request: Request, raw: bool, params: SamplingParams) -> Completion:
        """Generation plus teacher-forced scores: echo's prompt log-probabilities, top alternatives."""
        if self.text is None:
            raise ApiError(400, f"the '{self.backend.name}' backend cannot report prompt or top log-probabilities")
        result = None
        if job.generate:
            [result] = backend.generate([request], params)
        prompt = job.prompt.text if isinstance(job.prompt.text, list) else request
        generated = result.token_ids if result else []
        prompt_ids, scores = self.text.score(prompt, raw, generated, job.top)
        n = len(prompt_ids)
        if not job.echo:
            return Completion(result, scores=scores[n:] if params.logprobs else None)
        return Completion(result, prompt_ids, self.text.decode(prompt_ids), scores[:n], scores[n:] if params.logprobs else None)

    def _run_stream(self, job: _Job) -> None:
        try:
            backend, request, _, params = self._prepare(job)
            events: Iterator[TokenEvent] = backend.stream(request, params)
            try:
                for event in events:
                    if job.cancelled:
                        log.info("client went away mid-stream: stopping its generation")
                        return
                    token = None
                    if event.token_id is not None:
                        token = self.text.token_texts([event.token_id])[0] if self.text else event.text
                    self._deliver(job, StreamItem(event, token))
            finally:
                close = getattr(events, "close", None)
                if close:
                    close()
        except BaseException as exc:
            self._deliver(job, self._as_api_error(exc))
