"""One sequence's KV cache kept between calls: score new tokens on top of what was read before.

    runner = backend.kv_runner()
    state = runner.open(request)                 # the prompt prefilled (images and all)
    rows = runner.extend(state, [tok1, tok2])    # next-token logits after each new token
    rows = runner.tail(state, ids, n=3)          # make the state cover `ids`, reusing the longest
                                                 # common prefix; the logits of the last n positions

What draft–verify decoding and the caches are built on: the edge drafts by extending its state a
token at a time, the cloud verifies a round's tokens in one forward pass over its session's
state, and a state cropped back to a common prefix is reused rather than prefilled again.

The prefill is the model's own forward (the family's image handling and positions; through the
backend's prefix cache where it has one, so sessions share prompts' KV with chat requests); later tokens
go through the adapter's language model and lm_head with positions that continue the prefill's
(3-D for M-RoPE models), over transformers' DynamicCache. A state's cache holds exactly one entry
per id it has read, so a state can be cropped anywhere; models whose prefill drops or merges
tokens (visual-token pruning) keep fewer and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from edgelmm.backends.prefix_cache import cache_argument, forward_from, insert, lookup, output_cache
from edgelmm.errors import EdgelmmError


@dataclass
class KVState:
    """What one sequence has read: its ids, their cache, the next position, the last logits."""

    ids: list[int]
    prompt_tokens: int  # the first ids are the prompt (image tokens expanded)
    cache: Any  # transformers' DynamicCache
    start_position: torch.Tensor  # [..., 1, 1]: the position of ids[prompt_tokens]
    logits: torch.Tensor | None  # [vocab] float32, after the last id; None just after a crop
    prompt_logits: torch.Tensor  # [vocab] float32, after the prompt (kept: a round may need it again)

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def position(self, index: int, count: int) -> torch.Tensor:
        """Positions of ids[index : index + count] (index >= prompt_tokens)."""
        steps = torch.arange(count, device=self.start_position.device) + (index - self.prompt_tokens)
        return self.start_position + steps


def top_of(rows: torch.Tensor, top: int) -> list[list[tuple[int, float]]]:
    """The top-k (id, log-probability) of each row of logits, best first."""
    values, indices = torch.log_softmax(rows.float(), -1).topk(top, dim=-1)
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVRunner:
    """KV states of one loaded torch model (see the module doc); call it from the model's thread."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.model, self.adapter, self.device = backend.model, backend.adapter, backend.device
        self.language_model = self.adapter.language_model()
        self.lm_head = self.adapter.lm_head()
        self.cache_argument = cache_argument(self.language_model)

    def open(self, request: Any, tokens: list[int] | tuple[int, ...] = ()) -> tuple[KVState, torch.Tensor]:
        """Prefill `request`'s prompt, and `tokens` after it, in one forward pass: the new state
        and the next-token logits after the prompt and after each of `tokens` [1 + len(tokens), vocab]."""
        [opened] = self.open_many([request], [tokens])
        if isinstance(opened, BaseException):
            raise opened
        return opened

    @torch.inference_mode()
    def open_many(self, requests: list[Any], tokens: list[list[int] | tuple[int, ...]]) -> list[Any]:
        """`open` for several requests, each answered by its (state, rows) or by the exception
        that stopped it alone. Prompts the prefix cache does not hold and whose inputs have the
        same length are prefilled together, in one forward pass with no padding."""
        out: list[Any] = [None] * len(requests)
        prefix = self.backend.prefix_cache
        groups: dict[tuple[Any, ...], list[tuple[int, dict[str, torch.Tensor], Any]]] = {}
        for i, (request, extra) in enumerate(zip(requests, tokens)):
            try:
                inputs = self.backend.prepare_inputs([request], None)
                prompt = inputs["input_ids"].shape[1]
                if extra:
                    self.adapter.check_token_ids(list(extra))
                    inputs = self.adapter.append_tokens(inputs, torch.tensor(list(extra), device=self.device))
                keys, hit = (None, None) if prefix is None else lookup(self.adapter, inputs, prefix,
                                                                        request.all_images(), prompt)
                if hit is not None and hit.tokens:  # its own pass, on top of what is cached
                    out[i] = self._prefill([inputs], [prompt], len(extra) + 1, hit)[0]
                    continue
                shape = tuple((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor))
                groups.setdefault((shape, prompt), []).append((i, inputs, keys))
            except Exception as exc:  # noqa: BLE001  (this request's error, answered to it alone)
                out[i] = exc
        for (_, prompt), group in groups.items():
            try:
                rows = self._prefill([inputs for _, inputs, _ in group], [prompt] * len(group),
                                     group[0][1]["input_ids"].shape[1] - prompt + 1, None)
            except Exception as exc:  # noqa: BLE001
                rows = [exc] * len(group)
            for (i, _, keys), opened in zip(group, rows):
                out[i] = opened
                if prefix is not None and not isinstance(opened, BaseException):
                    insert(prefix, keys, opened[0].cache, prompt)
        return out

    def _prefill(self, inputs: list[dict[str, torch.Tensor]], prompts: list[int], keep: int, hit: Any) -> list[Any]:
        """One forward pass over same-length inputs (on top of `hit`, for one input): a state and
        its last `keep` rows of logits per input."""
        seen: dict[str, Any] = {}

        def note_positions(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen.setdefault("positions", kwargs.get("position_ids"))

        batch = self.adapter.collate(inputs)
        hook = self.language_model.register_forward_pre_hook(note_positions, with_kwargs=True)
        try:
            with self.backend.attention():
                if hit is None:
                    out = self.model(**batch, use_cache=True, logits_to_keep=keep)
                else:
                    out = forward_from(self.model, self.adapter, batch, hit, logits_to_keep=keep)
        finally:
            hook.remove()
        cache = output_cache(out)
        length = batch["input_ids"].shape[1]
        if cache.get_seq_length() != length:
            raise EdgelmmError(f"{self.backend.spec.display_name}: its prefill keeps {cache.get_seq_length()} of "
                               f"{length} prompt tokens (visual-token pruning), and a kept KV state needs them all",
                               "load the model without pruning methods for draft-verify and KV caches")
        positions = seen.get("positions")
        opened = []
        for b, prompt in enumerate(prompts):
            row: Any = cache
            if len(inputs) > 1:
                row = DynamicCache()
                for layer, kept in enumerate(cache.layers):
                    row.update(kept.keys[b: b + 1].clone(), kept.values[b: b + 1].clone(), layer)
            if isinstance(positions, torch.Tensor):  # [..., B or 1, L]: the positions the model laid out
                at = min(b, positions.shape[-2] - 1)
                start = positions[..., at: at + 1, prompt - 1: prompt] + 1
            else:
                start = torch.full((1, 1), prompt, device=self.device, dtype=torch.long)
            rows = out.logits[b].float()
            opened.append((KVState(batch["input_ids"][b].tolist(), prompt, row, start, rows[-1], rows[0]), rows))
        return opened

    @torch.inference_mode()
    def extend(self, state: KVState, tokens: list[int]) -> torch.Tensor:
        """Read `tokens` after the state's ids; the next-token logits after each [len(tokens), vocab]."""
        if not tokens:
            return state.prompt_logits.new_empty(0, state.prompt_logits.shape[-1])
        self.adapter.check_token_ids(tokens)
        ids = torch.tensor([tokens], device=self.device)
        position = state.position(len(state.ids), len(tokens))
        with self.backend.attention():
            out = self.language_model(input_ids=ids, position_ids=position, use_cache=True, **{self.cache_argument: state.cache})
        logits = self.lm_head(out[0][0]).float()
        state.ids.extend(tokens)
        state.logits = logits[-1]
        return logits

    @torch.inference_mode()
    def extend_many(self, states: list[KVState], tokens: list[list[int]]) -> list[torch.Tensor]:
        """`extend` for several states in one forward pass: their caches copied, left-padded, into
        one batch (a row attends to its own entries only), and each row's new entries appended
        to its own state afterwards. The copy is what batching costs without a paged cache."""
        live = [i for i, t in enumerate(tokens) if t]
        out = [states[0].prompt_logits.new_empty(0, states[0].prompt_logits.shape[-1]) for _ in states]
        if len(live) <= 1:
            for i in live:
                out[i] = self.extend(states[i], tokens[i])
            return out
        rows = [states[i] for i in live]
        news = [tokens[i] for i in live]
        for new in news:
            self.adapter.check_token_ids(new)
        lengths, counts = [len(s.ids) for s in rows], [len(t) for t in news]
        batch, past, width = len(rows), max(lengths), max(counts)
        cache: Any = DynamicCache()
        for layer in range(len(rows[0].cache.layers)):
            parts = []
            for kind in ("keys", "values"):
                first = getattr(rows[0].cache.layers[layer], kind)
                padded = first.new_zeros(batch, first.shape[1], past, first.shape[3])
                for b, state in enumerate(rows):
                    padded[b, :, past - lengths[b]:] = getattr(state.cache.layers[layer], kind)[0]
                parts.append(padded)
            cache.update(parts[0], parts[1], layer)
        ids = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        positions = []
        dtype = next(self.model.parameters()).dtype
        minimum = torch.finfo(dtype).min
        mask = torch.full((batch, 1, width, past + width), minimum, dtype=dtype, device=self.device)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        for b, (state, new) in enumerate(zip(rows, news)):
            ids[b, : len(new)] = torch.tensor(new, device=self.device)
            position = state.position(len(state.ids), width)  # padding continues the positions; never read
            positions.append(position)
            mask[b, 0, :, past - lengths[b]: past] = 0.0
            mask[b, 0, :, past:] = torch.where(causal, 0.0, minimum)
        position_ids = torch.cat(positions, dim=-2)
        with self.backend.attention():
            hidden = self.language_model(input_ids=ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                                         **{self.cache_argument: cache})[0]
        logits = self.lm_head(hidden).float()
        for b, (state, new) in enumerate(zip(rows, news)):
            for layer, kept in enumerate(cache.layers):
                state.cache.update(kept.keys[b: b + 1, :, past: past + len(new)].clone(),
                                   kept.values[b: b + 1, :, past: past + len(new)].clone(), layer)
            state.ids.extend(new)
            state.logits = logits[b, len(new) - 1]
            out[live[b]] = logits[b, : len(new)]
        return out

    def crop(self, state: KVState, length: int) -> None:
        """Forget every id after the first `length` (never into the prompt)."""
        if length >= len(state.ids):
            return
        if length < state.prompt_tokens:
            raise EdgelmmError(f"a KV state cannot be cropped into its prompt ({length} < {state.prompt_tokens} tokens)")
        state.cache.crop(length - len(state.ids))  # transformers crops by how many to remove
        del state.ids[length:]
        state.logits = None

    def tail(self, state: KVState, ids: list[int], n: int) -> tuple[torch.Tensor, int]:
        """Make `state` cover exactly `ids` (which begin with its prompt) and return the logits
        after each of their last `n` ids [n, vocab], with how many ids were read to get them."""
        [(rows, read)] = self.tail_many([state], [ids], [n])
        return rows, read

    def tail_many(self, states: list[KVState], ids: list[list[int]], n: list[int]) -> list[tuple[torch.Tensor, int]]:
        """`tail` for several states, their new ids read in one forward pass (`extend_many`)."""
        plans = [self._plan(*args) for args in zip(states, ids, n)]
        rows = self.extend_many(states, [new for _, new in plans])
        out = []
        for state, (head, new), got, count in zip(states, plans, rows, n):
            full = torch.cat([head, got]) if head is not None else got
            if head is not None and not new:
                state.logits = head[-1]
            out.append((full[-count:], len(new)))
        return out

    def _plan(self, state: KVState, ids: list[int], n: int) -> tuple[torch.Tensor | None, list[int]]:
        """Crop `state` for `tail`: (rows it already has that the answer starts with, ids to read)."""
        if n < 1 or n > len(ids) - state.prompt_tokens + 1:
            raise EdgelmmError(f"asked for the logits of {n} positions of a sequence that has "
                               f"{len(ids) - state.prompt_tokens} ids after its prompt")
        if ids[: state.prompt_tokens] != state.ids[: state.prompt_tokens]:
            raise EdgelmmError("these ids do not begin with the state's prompt")
        keep = min(common_prefix(state.ids, ids), len(ids) - n)
        if n == 1 and len(state.ids) == len(ids) == keep + 1 and state.logits is not None:
            return state.logits[None], []  # nothing new: the last logits are at hand
        if keep < state.prompt_tokens:  # the prompt's last logits come from its prefill
            self.crop(state, state.prompt_tokens)
            return state.prompt_logits[None], ids[state.prompt_tokens:]
        self.crop(state, keep)
        return None, ids[keep:]
