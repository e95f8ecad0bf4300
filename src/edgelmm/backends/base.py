"""The one interface every engine sits behind.

Nothing here names torch: a backend may run in process (transformers, vLLM, llama.cpp) or talk
to a server, and the benchmark, server and collaboration code only ever see these types.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from edgelmm.config import ModelSpec, SamplingParams


@dataclass
class Request:
    prompt: str
    images: list[Any] = field(default_factory=list)  # PIL images
    id: str | None = None


@dataclass
class Timings:
    """Wall-clock times of one request, seconds.

    ttft_s runs from the call until the first generated token is known (prefill plus one
    sampling step); decode_s holds the time of every later token, one entry per token.
    """

    ttft_s: float
    decode_s: list[float]
    e2e_s: float

    @classmethod
    def from_stamps(cls, t0: float, stamps: list[float], end: float) -> Timings:
        """From the clock readings at which each token was known (start t0, finish end)."""
        return cls(
            ttft_s=(stamps[0] if stamps else end) - t0,
            decode_s=[b - a for a, b in zip(stamps, stamps[1:])],
            e2e_s=end - t0,
        )

    @property
    def tpot_s(self) -> float | None:
        """Median time per output token after the first; None for a single token."""
        return statistics.median(self.decode_s) if self.decode_s else None


@dataclass
class Counts:
    prompt_tokens: int
    visual_tokens: int
    generated_tokens: int


@dataclass
class Result:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    timings: Timings
    counts: Counts
    peak_memory_bytes: int | None
    finish_reason: str = "length"  # "stop" (end of sequence or stop string) or "length"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenEvent:
    """One step of a stream; the last event has `result` set."""

    token_id: int | None
    text: str  # the new text this token adds (may be empty inside a multi-byte character)
    logprob: float | None
    time_s: float  # since the request started
    result: Result | None = None


class Backend(ABC):
    """load once, then generate (batched) or stream (one request)."""

    name: str = "base"

    def __init__(self) -> None:
        self.spec: ModelSpec | None = None

    @abstractmethod
    def load(self, spec: ModelSpec) -> None: ...

    @abstractmethod
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]: ...

    @abstractmethod
    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]: ...

    def generate_sequentially(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """`generate` for engines that run one sequence at a time: each result from its own stream."""
        results = []
        for request in requests:
            *_, last = self.stream(request, params)
            results.append(last.result)
        return results

    def device_name(self) -> str:
        """Where the model runs, in words (for reports)."""
        return "unknown"

    def close(self) -> None:
        """Free the model; the backend can be loaded again afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
