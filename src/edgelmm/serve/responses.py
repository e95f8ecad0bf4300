"""Results in the OpenAI response shapes (and vLLM's extensions to them): pure functions.

Log-probability entries name each token by its text (special tokens included) or, when a client
asks with `return_tokens_as_token_ids`, as "token_id:N"; `texts` maps token ids to their text
(looked up in the engine thread, which owns the tokenizer).
"""

from __future__ import annotations

from typing import Any

from edgelmm.backends.base import Result, TokenScore


class Names:
    """How a response names tokens: by text, or by id."""

    def __init__(self, texts: dict[int, str], as_ids: bool):
        self.texts, self.as_ids = texts, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.texts.get(token, "")

    def text(self, token: int) -> str:
        return self.texts.get(token, "")


def usage(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int]:
    prompt = prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def result_usage(results: list[Result]) -> dict[str, int]:
    return usage(sum(r.counts.prompt_tokens or 0 for r in results), sum(r.counts.generated_tokens for r in results))


def chat_logprobs(ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]] | None,
                  names: Names) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        name = names(token)
        return {"token": name, "logprob": logprob, "bytes": list(names.text(token).encode())}

    return {"content": [
        {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (tops[i] if tops else [])]}
        for i, (t, lp) in enumerate(zip(ids, logprobs))
    ]}


def completion_logprobs(scores: list[TokenScore], names: Names, offset: int = 0) -> dict[str, Any]:
    """The legacy completions form; each position's `top` dict also holds the chosen token, as vLLM's."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    position = offset
    for s in scores:
        tokens.append(names(s.token_id))
        token_logprobs.append(s.logprob)
        if s.logprob is None:
            tops.append(None)
        else:
            top = {names(t): lp for t, lp in s.top}
            top.setdefault(names(s.token_id), s.logprob)
            tops.append(top)
        offsets.append(position)
        position += len(names.text(s.token_id))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def generated_scores(result: Result) -> list[TokenScore]:
    """The generated tokens as positions with scores (for the completions form)."""
    logprobs = result.logprobs or [None] * len(result.token_ids)
    tops = result.top_logprobs or [[] for _ in result.token_ids]
    return [TokenScore(t, lp, top) for t, lp, top in zip(result.token_ids, logprobs, tops)]


def vllm_prompt_logprobs(scores: list[TokenScore], names: Names) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}."""
    out: list[dict[str, Any] | None] = []
    for s in scores:
        if s.logprob is None:
            out.append(None)
            continue
        ranked = {t: (lp, rank) for rank, (t, lp) in enumerate(s.top, start=1)}
        ranked.setdefault(s.token_id, (s.logprob, None))
        out.append({str(t): {"logprob": lp, "rank": rank, "decoded_token": names.text(t)} for t, (lp, rank) in ranked.items()})
    return out
