"""The decode loop of the engines that hand edgelmm one row of logits per step (llama.cpp, ONNX
Runtime): sampling, log-probabilities, stop handling and the stream's events, in numpy.

The engine supplies the first token's logits and `advance(token)`, which feeds a token and
returns the next logits; everything a user sees (greedy / temperature / top-k / top-p, logprobs,
stop strings, end tokens, the clock stamped when each token's logits exist) is the same for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edgelmm.backends.base import Counts, Detokenizer, Result, Timings, TokenEvent, TokenScore
from edgelmm.config import SamplingParams


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus), then a draw."""
    if params.greedy:
        return int(np.argmax(logits))
    logprobs = log_softmax(logits.astype(np.float64) / params.temperature)
    order = np.argsort(-logprobs)
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(logprobs[order])
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p * probs.sum())) + 1
        order, probs = order[:keep], probs[:keep]
    return int(rng.choice(order, p=probs / probs.sum()))


def top_of(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    return [(int(b), float(logprobs[b])) for b in np.argsort(-logprobs)[:k]] if k else []


def prompt_scores(ids: list[int], logits: np.ndarray, top: int) -> list[TokenScore]:
    """Teacher-forced scores of a prompt from the logits at each of its positions ([len(ids), vocab])."""
    scores = [TokenScore(ids[0], None)]
    for i, token in enumerate(ids[1:]):
        logprobs = log_softmax(logits[i].astype(np.float64))
        scores.append(TokenScore(token, float(logprobs[token]), top_of(logprobs, top)))
    return scores


@dataclass
class Decoded:
    """What a decode loop produced so far."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    finish: str = "length"
    reason: str | int | None = None


def decode_tokens(logits: np.ndarray, advance: Callable[[int], np.ndarray], params: SamplingParams, seed: int,
                  detok: Detokenizer, t0: float, out: Decoded) -> Iterator[TokenEvent]:
    """Sample up to max_new_tokens from `logits` on, feeding each token back through `advance`."""
    rng = np.random.default_rng(params.seed if params.seed is not None else seed)
    for _ in range(params.max_new_tokens):
        out.stamps.append(time.perf_counter())
        token = pick(logits, params, rng)
        out.ids.append(token)
        logprob, top = None, None
        if params.wants_logprobs:
            scores = log_softmax(logits.astype(np.float64))
            logprob = float(scores[token])
            out.logprobs.append(logprob)
            if params.top_logprobs:
                top = top_of(scores, params.top_logprobs)
                out.tops.append(top)
        delta = detok.push(token)
        yield TokenEvent(token, delta, logprob, out.stamps[-1] - t0, top)
        if token in detok.end_tokens:
            out.finish, out.reason = "stop", token
            break
        if detok.stopped is not None:
            out.finish, out.reason = "stop", detok.stopped
            break
        if len(out.ids) < params.max_new_tokens:
            logits = advance(token)


def finish_stream(out: Decoded, detok: Detokenizer, params: SamplingParams, t0: float, prompt: list[int], visual: int,
                  peak: int | None, scores: list[TokenScore] | None) -> Iterator[TokenEvent]:
    """The stream's last events: text held back for a stop string that never completed, then the Result."""
    tail = detok.flush()
    if tail:
        yield TokenEvent(None, tail, None, time.perf_counter() - t0)
    end = time.perf_counter()
    result = Result(
        text=detok.final_text, token_ids=out.ids, logprobs=out.logprobs if params.wants_logprobs else None,
        timings=Timings.from_stamps(t0, out.stamps[: max(len(out.ids), 1)], end),
        counts=Counts(len(prompt), visual, len(out.ids)), peak_memory_bytes=peak, finish_reason=out.finish,
        stop_reason=out.reason, top_logprobs=out.tops if params.top_logprobs else None,
        prompt_token_ids=prompt, prompt_logprobs=scores,
    )
    yield TokenEvent(None, "", None, end - t0, result=result)
