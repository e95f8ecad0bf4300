"""Token-level access to a loaded model: what the OpenAI API needs beyond `Backend`.

`Backend.generate` takes one user message and applies the model's chat template itself. An
OpenAI server also needs the model's own text: `/v1/completions` prompts are raw text (or token
ids), multi-turn chats are rendered with the template, `echo` and `top_logprobs` need the
log-probabilities of given tokens (the next issue's draft–verify decoding asks the server for
exactly these), and limits need prompt lengths before anything runs. `TextAccess` is that
capability; `text_access(backend)` finds it: a backend may implement it itself (llama.cpp
does), and the torch backend gets `TorchText`, which works on its public model and adapter.

Every method here may touch the tokenizer, so the server calls them only from its one engine
thread (fast tokenizers raise "Already borrowed" when two threads use one at once).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edgelmm.backends.base import Backend, Request
from edgelmm.errors import EdgelmmError


@dataclass
class TokenScore:
    """One position: the token there, its log-probability given everything before, and the
    `top` most likely tokens at that position as (text, logprob), best first."""

    token_id: int
    text: str
    logprob: float | None  # None for the first token of a sequence: nothing precedes it
    top: list[tuple[str, float]] = field(default_factory=list)


@runtime_checkable
class TextAccess(Protocol):
    max_context: int  # prompt plus generated tokens the model can attend to

    def raw_backend(self) -> Backend:
        """The same model as a Backend whose Request.prompt is the model's whole input text."""
        ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """A conversation (HF message format, images as {"type": "image"}) as model text."""
        ...

    def prompt_ids(self, request: Request, raw: bool) -> list[int]:
        """The token ids the model reads for a request, image placeholders expanded."""
        ...

    def decode(self, token_ids: list[int]) -> str: ...

    def token_texts(self, token_ids: list[int]) -> list[str]: ...

    def score(self, prompt: Request | list[int], raw: bool, continuation: list[int], top: int) -> tuple[list[int], list[TokenScore]]:
        """Teacher-forced log-probabilities of prompt + continuation.

        Returns the prompt's ids and one TokenScore per token of prompt + continuation (the first
        with logprob None). A prompt given as ids is scored exactly as given.
        """
        ...


class TorchText:
    """TextAccess for the in-process torch backend."""

    def __init__(self, backend: Any):
        self.backend = backend
        adapter = backend.adapter
        # The raw view: the family's own adapter class with the chat template step taken out, so
        # batching, padding, image expansion and generation stay exactly the torch backend's.
        raw_cls = type(f"Raw{type(adapter).__name__}", (type(adapter),), {"chat_text": lambda self, prompt, images: prompt})
        self._raw = copy.copy(backend)
        self._raw.adapter = raw_cls(backend.model, backend.processor)
        self.max_context = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 2048)

    @property
    def _tokenizer(self) -> Any:
        return self.backend.adapter.tokenizer

    def raw_backend(self) -> Backend:
        return self._raw

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError) as exc:
            raise EdgelmmError(f"the model's chat template rejects this conversation: {exc}") from None

    def _inputs(self, request: Request, raw: bool) -> dict[str, Any]:
        adapter = (self._raw if raw else self.backend).adapter
        return adapter.build_batch([(request.prompt, list(request.images))])

    def prompt_ids(self, request: Request, raw: bool) -> list[int]:
        return self._inputs(request, raw)["input_ids"][0].tolist()

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def score(self, prompt: Request | list[int], raw: bool, continuation: list[int], top: int) -> tuple[list[int], list[TokenScore]]:
        import torch

        backend = self.backend
        if isinstance(prompt, list):
            inputs: dict[str, Any] = {"input_ids": torch.tensor([prompt])}
        else:
            inputs = self._inputs(prompt, raw)
        n = inputs["input_ids"].shape[1]
        extra = torch.tensor([continuation], dtype=torch.long)
        dtype = next(backend.model.parameters()).dtype
        full = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == n:
                # per-token inputs grow by the continuation (text: ids, mask ones, type ids zeros)
                value = torch.cat([value, extra if key == "input_ids" else torch.full_like(extra, int(key == "attention_mask"))], 1)
            if isinstance(value, torch.Tensor):
                value = value.to(backend.device, dtype=dtype if value.is_floating_point() else None)
            full[key] = value
        with torch.inference_mode():
            logits = backend.model(**full).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, -1)
        ids = full["input_ids"][0].tolist()
        chosen = logprobs.gather(1, full["input_ids"][0, 1:, None]).squeeze(1).tolist()
        texts = self.token_texts(ids)
        scores = [TokenScore(ids[0], texts[0], None)]
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            alternatives = [
                list(zip(self.token_texts(row_ids), row_values))
                for row_ids, row_values in zip(indices.tolist(), values.tolist())
            ]
        for i, token in enumerate(ids[1:]):
            scores.append(TokenScore(token, texts[i + 1], chosen[i], alternatives[i] if top else []))
        return ids[:n], scores


def text_access(backend: Backend) -> TextAccess | None:
    """The backend's own TextAccess, TorchText for the torch backend, else None (chat only)."""
    if isinstance(backend, TextAccess):
        return backend
    if backend.name == "torch":
        return TorchText(backend)
    return None
