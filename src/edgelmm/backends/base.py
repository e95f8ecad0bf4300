"""The one interface every engine sits behind, and the types it answers in.

Nothing here names torch: a backend may run in process (transformers, vLLM, llama.cpp) or talk
to a server, and the benchmark and server code only ever see these types. A
request is a `Request` (messages, text or token ids, see `edgelmm.request`); what to decode and
which scores to return is `SamplingParams`; the answer is a `Result` (or a stream of
`TokenEvent`s ending in one).

Tokens and text follow vLLM: the end-of-sequence token a model generates is kept in
`token_ids`, `logprobs` and the counts, and left out of the text; a stop string ends the text
before it (the tokens that spelled it stay in `token_ids`); a stream never shows a stop string,
nor the start of one that may still complete.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, RequestError
from edgelmm.request import Request

__all__ = [
    "AdapterTokens", "Backend", "Counts", "Detokenizer", "Request", "Result", "Timings", "TokenEvent", "TokenScore", "check_context",
]


@dataclass
class TokenScore:
    """One position of a sequence: the token there, its log-probability given everything before
    it (None for a sequence's first token, which nothing precedes), and the `top` most likely
    tokens at that position as (token id, log-probability), best first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


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
    prompt_tokens: int | None  # None where an engine does not say (a server that sends no usage)
    visual_tokens: int
    generated_tokens: int


@dataclass
class Result:
    text: str
    token_ids: list[int]  # every generated token, the end-of-sequence token included
    logprobs: list[float] | None  # one per token_ids entry, when asked
    timings: Timings
    counts: Counts
    peak_memory_bytes: int | None
    finish_reason: str = "length"  # "stop" (end of sequence or stop string) or "length"
    stop_reason: str | int | None = None  # the stop string, or the end token's id, that ended it
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per generated token, when asked
    prompt_token_ids: list[int] | None = None  # what the model read, image tokens expanded
    prompt_logprobs: list[TokenScore] | None = None  # one per prompt token, when asked
    decode_path: str | None = None  # how the engine decoded, where it says (torch: "cuda-graph", "static", "generate")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenEvent:
    """One step of a stream; the last event has `result` set."""

    token_id: int | None
    text: str  # the new text this token lets the stream show (may be empty: held back, or EOS)
    logprob: float | None
    time_s: float  # since the request started
    top: list[tuple[int, float]] | None = None
    result: Result | None = None


class Detokenizer:
    """Generated token ids -> the text a user may see, as the ids arrive.

    Incremental detokenization as vLLM and transformers' streamers do it (decode a small window
    and keep what it adds, never half a multi-byte character), end tokens skipped, and stop
    strings applied: `push` returns only text that cannot turn out to begin a stop string, and
    once one completes, `stopped` names it and nothing after it is shown.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], end_tokens: set[int]):
        self.decode, self.stop, self.end_tokens = decode, list(stop), end_tokens
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (stop strings included)
        self.shown = 0  # characters of `text` handed out
        self.stopped: str | None = None
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        if self.stopped is not None or token in self.end_tokens:
            return ""
        self.ids.append(token)
        prefix_text = self.decode(self.ids[self._prefix:self._read])
        new_text = self.decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # inside a multi-byte character, or a token that adds no text yet
        self.text += new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.shown - longest + 1)
        cuts = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if cuts:
            cut, self.stopped = min(cuts)
            end = max(cut, self.shown)
        else:  # hold back a tail that may still grow into a stop string
            hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
            end = max(len(self.text) - hold, self.shown)
        delta, self.shown = self.text[self.shown:end], end
        return delta

    def flush(self) -> str:
        """At the end of generation: the held-back tail that never became a stop string, and
        tokens that never completed a character (shown as the replacement character, as a
        whole-sequence decode shows them)."""
        if self.stopped is not None:
            return ""
        prefix_text = self.decode(self.ids[self._prefix:self._read])
        new_text = self.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text):]
            self._prefix = self._read = len(self.ids)
        delta, self.shown = self.text[self.shown:], len(self.text)
        return delta

    @property
    def final_text(self) -> str:
        return self.text[: self.shown] if self.stopped is not None else self.text


def check_context(prompt_tokens: int, params: SamplingParams, max_context: int | None) -> None:
    """A prompt plus the tokens asked for must fit the model's context."""
    if max_context is not None and prompt_tokens + params.max_new_tokens > max_context:
        raise RequestError(
            f"this model's context is {max_context} tokens, but the prompt has {prompt_tokens} and "
            f"{params.max_new_tokens} more were asked for",
            "shorten the prompt or lower max_new_tokens", code="context_length_exceeded",
        )


class AdapterTokens:
    """Token-level access through a model adapter's tokenizer and chat template, for backends that
    build their inputs with the family's own processor (torch, onnx). `_check` refuses before load."""

    adapter: Any
    processor: Any

    def _check(self) -> None:
        if self.adapter is None:
            raise EdgelmmError(f"the {getattr(self, 'name', '')} backend has no model loaded", "call load(spec) first")

    def prompt_token_ids(self, request: Request) -> list[int]:
        self._check()
        return list(self.adapter.prompt_ids(request))

    def token_texts(self, token_ids: list[int]) -> list[str]:
        self._check()
        return list(self.adapter.token_texts(token_ids))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._check()
        return list(self.adapter.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        self._check()
        self.adapter.check_token_ids(token_ids)
        return str(self.adapter.tokenizer.decode(token_ids, skip_special_tokens=False))

    def tokenizer_info(self) -> dict[str, Any]:
        self._check()
        tokenizer = self.adapter.tokenizer
        template = getattr(self.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "chat_template": template,
                "model_max_length": getattr(self, "max_context", None)}


class Backend(ABC):
    """load once, then generate (batched) or stream (one request)."""

    name: str = "base"
    # The spec options the backend reads, with their defaults (None: it takes none, or checks its own);
    # a benchmark checks every model's options against them before anything loads.
    known_options: ClassVar[dict[str, Any] | None] = None

    def __init__(self) -> None:
        self.spec: ModelSpec | None = None

    @abstractmethod
    def load(self, spec: ModelSpec) -> None: ...

    @abstractmethod
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]: ...

    @abstractmethod
    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]: ...

    # ------------------------------------------------------------ token-level access, where the engine has it
    @property
    def max_context(self) -> int | None:
        """Prompt plus generated tokens the model can attend to; None where unknown."""
        return None

    def prompt_token_ids(self, request: Request) -> list[int] | None:
        """The ids the model reads for a request (image tokens expanded); None where unknown."""
        return None

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token as text on its own, special tokens included (for log-probability entries)."""
        raise EdgelmmError(f"the {self.name} backend cannot turn token ids into text")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer alone on `text` (no chat template, no images)."""
        raise EdgelmmError(f"the {self.name} backend has no tokenizer to offer")

    def detokenize(self, token_ids: list[int]) -> str:
        """Token ids back to text, special tokens included."""
        raise EdgelmmError(f"the {self.name} backend has no tokenizer to offer")

    def tokenizer_info(self) -> dict[str, Any]:
        """What a client needs to tokenize as the model does: special tokens, chat template, length."""
        raise EdgelmmError(f"the {self.name} backend has no tokenizer to offer")

    # ------------------------------------------------------------ helpers
    def generate_sequentially(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """`generate` for engines that run one sequence at a time: each result from its own stream."""
        results = []
        for request in requests:
            *_, last = self.stream(request, params)
            assert last.result is not None, f"the {self.name} backend's stream ended without a result"
            results.append(last.result)
        return results

    def device_name(self) -> str:
        """Where the model runs, in words (for reports)."""
        return "unknown"

    def close(self) -> None:  # noqa: B027  (nothing to free, unless the engine says otherwise)
        """Free the model; the backend can be loaded again afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
