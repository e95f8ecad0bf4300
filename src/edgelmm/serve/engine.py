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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from edgelmm.backends.base import Backend, Request, Result, TokenEvent
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.serve.errors import ApiError, as_api_error, log


@dataclass
class Completion:
    result: Result
    queued_s: float = 0.0  # time spent waiting for the engine
    texts: dict[int, str] = field(default_factory=dict)  # token id -> text, for log-probability entries
    extension: dict[str, Any] | None = None  # sent as the answer's `edgelmm` field (where it was served, ...)


@dataclass
class StreamItem:
    event: TokenEvent
    texts: dict[int, str]  # token id -> text of the event's token and its alternatives
    extension: dict[str, Any] | None = None  # on the last item: as Completion.extension


def scored_ids(result: Result) -> list[int]:
    """Every token id a result's log-probabilities name (generated, alternatives, prompt)."""
    ids = list(result.token_ids)
    for top in result.top_logprobs or []:
        ids += [t for t, _ in top]
    if result.prompt_logprobs is not None:
        ids += result.prompt_token_ids or []
        for score in result.prompt_logprobs:
            ids += [t for t, _ in score.top]
    return ids


@dataclass
class _Job:
    request: Request | None
    params: SamplingParams | None
    explicit_max_tokens: bool
    stream: bool
    loop: asyncio.AbstractEventLoop
    work: Callable[[], Any] | None = None  # a call that must run where the tokenizer lives
    group: tuple[str, Callable[[list[Any]], list[Any]]] | None = None  # (key, run): calls run together
    item: Any = None  # this job's part of a group call
    future: asyncio.Future | None = None
    queue: asyncio.Queue | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    texts: bool = True  # look up the text of every scored token (for log-probability entries)

    @property
    def batchable(self) -> bool:
        """Plain generation whose answer does not depend on what else is in the batch."""
        return self.work is None and self.group is None and not self.stream and (
            self.params.greedy or self.params.seed is None)

    def batch_key(self) -> str:
        return self.params.model_dump_json()


class Stream:
    """An open streaming job: async-iterate for TokenEvents (the last has `result` set);
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
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.limit_context = max_context  # the server's own bound, tighter than the model's
        self.max_context = max_context or backend.max_context
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.running = 0  # jobs in the model right now
        self._thread = threading.Thread(target=self._loop, name="edgelmm-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def status(self) -> dict[str, Any]:
        """What /health reports about the engine."""
        return {"waiting": self.queued, "running": self.running}

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

    async def complete(self, request: Request, params: SamplingParams, explicit_max_tokens: bool = True,
                       texts: bool = True) -> Completion:
        """Run one request to its end. `texts=False` skips the token texts of its log-probabilities
        (a caller that scores them itself, as the collab router does, needs none)."""
        loop = asyncio.get_running_loop()
        job = _Job(request, params, explicit_max_tokens, stream=False, loop=loop, future=loop.create_future(), texts=texts)
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True  # no-op once done; stops a queued job whose handler was cancelled

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` in the engine thread (tokenizer calls: tokenizers must not be shared across
        threads) and return what it returns; an error arrives as an ApiError."""
        loop = asyncio.get_running_loop()
        job = _Job(None, None, True, stream=False, loop=loop, future=loop.create_future(), work=work)
        self._submit(job)
        return await job.future

    async def call_grouped(self, key: str, run: Callable[[list[Any]], list[Any]], item: Any) -> Any:
        """Run `run([item, ...])` in the engine thread with the other waiting calls of the same
        `key` (up to max_batch_size): one forward pass for many clients' small jobs (draft-verify
        rounds). `run` answers one value per item, in order; an item's value that is an exception
        is raised to its caller alone."""
        loop = asyncio.get_running_loop()
        job = _Job(None, None, True, stream=False, loop=loop, future=loop.create_future(), group=(key, run), item=item)
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True

    def open_stream(self, request: Request, params: SamplingParams, explicit_max_tokens: bool = True,
                    texts: bool = True) -> Stream:
        """Queue a streaming job; iterate the Stream for its tokens. Call from the event loop."""
        loop = asyncio.get_running_loop()
        job = _Job(request, params, explicit_max_tokens, stream=True, loop=loop, queue=asyncio.Queue(), texts=texts)
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
            if first.group is not None:
                group = first.group[0]
                self._gather(batch, lambda job: job.group is not None and job.group[0] == group)
            elif first.batchable:
                key = first.batch_key()
                self._gather(batch, lambda job: job.batchable and job.batch_key() == key)
            return batch

    def _gather(self, batch: list[_Job], joins: Callable[[_Job], bool]) -> None:
        """Move waiting live jobs that `joins` accepts into `batch` (up to max_batch_size); the others keep their place."""
        kept: collections.deque[_Job] = collections.deque()
        while self._jobs and len(batch) < self.max_batch_size:
            job = self._jobs.popleft()
            if not job.cancelled:
                (batch if joins(job) else kept).append(job)
        self._jobs.extendleft(reversed(kept))

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            self.running = len(batch)
            try:
                if batch[0].group is not None:
                    self._run_group(batch)
                elif batch[0].work is not None:
                    self._run_call(batch[0])
                elif batch[0].stream:
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

    def _texts(self, ids: list[int]) -> dict[int, str]:
        """Token texts, looked up here: the engine thread is the one that may use the tokenizer."""
        unique = list(dict.fromkeys(ids))
        try:
            return dict(zip(unique, self.backend.token_texts(unique)))
        except EdgelmmError:
            return {}

    def _params(self, job: _Job) -> SamplingParams:
        """The context limit, before anything runs: an explicit max_tokens must fit; without one,
        as many tokens as the context leaves (up to the server's max_tokens)."""
        params = job.params
        if self.max_context is None or (job.explicit_max_tokens and self.limit_context is None):
            return params  # the backend checks its own context
        ids = self.backend.prompt_token_ids(job.request)
        if ids is None:
            return params
        n, room = len(ids), self.max_context - len(ids)
        if room < (params.max_new_tokens if job.explicit_max_tokens else 1):
            raise ApiError(
                400, f"this model's context is {self.max_context} tokens, but the prompt has {n} and "
                f"{params.max_new_tokens} more were asked for; shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
            )
        if not job.explicit_max_tokens:
            params = params.model_copy(update={"max_new_tokens": min(params.max_new_tokens, room)})
        return params

    def _run_batch(self, batch: list[_Job]) -> None:
        """Fix each job's settings (a short context may lower max_tokens), then run the jobs that
        ended up with the same settings together."""
        groups: dict[str, list[tuple[_Job, SamplingParams]]] = {}
        for job in batch:
            try:
                params = self._params(job)
            except BaseException as exc:
                self._deliver(job, as_api_error(exc))
                continue
            groups.setdefault(params.model_dump_json(), []).append((job, params))
        for group in groups.values():
            started = time.perf_counter()
            try:
                results = self.backend.generate([job.request for job, _ in group], group[0][1])
            except BaseException as exc:
                error = as_api_error(exc)
                for job, _ in group:
                    self._deliver(job, error)
                continue
            for (job, params), result in zip(group, results):
                wanted = job.texts and (params.wants_logprobs or params.prompt_logprobs is not None)
                texts = self._texts(scored_ids(result)) if wanted else {}
                self._deliver(job, Completion(result, started - job.enqueued, texts))

    def _run_call(self, job: _Job) -> None:
        try:
            self._deliver(job, job.work())
        except BaseException as exc:
            self._deliver(job, as_api_error(exc))

    def _run_group(self, batch: list[_Job]) -> None:
        assert batch[0].group is not None
        try:
            values = batch[0].group[1]([job.item for job in batch])
        except BaseException as exc:
            error = as_api_error(exc)
            values = [error] * len(batch)
        for job, value in zip(batch, values):
            self._deliver(job, as_api_error(value) if isinstance(value, BaseException) else value)

    def _run_stream(self, job: _Job) -> None:
        try:
            params = self._params(job)
            events: Iterator[TokenEvent] = self.backend.stream(job.request, params)
            try:
                for event in events:
                    if job.cancelled:
                        log.info("client went away mid-stream: stopping its generation")
                        return
                    ids = [] if event.token_id is None or not params.wants_logprobs or not job.texts else [event.token_id] + [t for t, _ in event.top or []]
                    self._deliver(job, StreamItem(event, self._texts(ids) if ids else {}))
            finally:
                close = getattr(events, "close", None)
                if close:
                    close()
        except BaseException as exc:
            self._deliver(job, as_api_error(exc))
