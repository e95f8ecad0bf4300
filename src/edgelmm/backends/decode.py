"""The torch backend's decode engine: a preallocated KV cache and one decode step, run through the
model's own language model, captured once as a CUDA graph and replayed per token.

A request is prefilled by the model as it always is (images, the family's own input handling,
pruning hooks: `StaticDecoder.prefill` calls the model's forward with transformers' dynamic
cache), then its cache is copied into preallocated buffers of a fixed length (the next multiple
of `BUCKET` tokens above prompt + new tokens, up to the engine's limit). Every later token is one
call of `_Step.run`: the language model's forward on one token per row, with

- `SlotCache`, transformers' cache interface over those buffers: each layer writes its new key
  and value at the step's slot (a device tensor) and attends over the whole buffer;
- an additive attention mask over the buffer (0 where a row may attend, the dtype's minimum where
  not: left padding, slots not written yet, tokens a pruning method dropped; log(m) for a token
  that stands for m merged ones), whose new slot the step opens itself;
- positions that continue the prefill's own (3-D for M-RoPE models), advanced by the step;
- the next token picked on the device (argmax, or temperature / top-k / top-p by an exponential
  race), with its log-probability and the most likely alternatives,

so that nothing in a step waits for the host and its shapes never change: a new prompt length
costs no new kernel plan. The buffers are kept per batch size and viewed by every cache length's
step. On CUDA the step is compiled by torch.compile (the cache length a dynamic dimension) and
captured once per (batch, cache length, sampling kind) as a CUDA graph, then replayed; the host
reads each token one step behind the device (a pinned copy and an event), so the GPU always has
the next step queued. On a CPU the same step runs eagerly by default, without transformers
`generate`'s per-token machinery.

No model class is named: the language model, its lm_head and its image tokens come from the
adapter. Models the step cannot serve exactly (sliding-window or hybrid attention, flash
attention's 2-D masks) are reported by `unsupported`, and the backend uses `generate` for them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache

from edgelmm.backends.prefix_cache import cache_argument, cached_forward, output_cache
from edgelmm.config import SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.methods.pruning import pruning_of

BUCKET = 256  # cache lengths are multiples of this: a few graphs serve every prompt length
TOP_MAX = 20  # alternatives a step can report (the OpenAI API's limit)
MAX_BATCH_SIZES = 2  # batch sizes whose KV buffers are kept between requests


class SlotCache(Cache):
    """transformers' cache interface over preallocated [batch, kv heads, length, head dim]
    buffers: `update` writes a step's keys and values at `slot` and returns the whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.keys, self.values, self.slot = keys, values, slot
        self.layers: list[Any] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states.to(keys.dtype))
        values.index_copy_(2, self.slot, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.keys[layer_idx].shape[2], 0

    @property
    def is_compileable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Prefilled:
    """What the prefill leaves for decoding: the last position's logits, the cache, which cache
    entries each row attends to (and with what additive weight), and the next positions."""

    logits: torch.Tensor  # [B, vocab] float32
    keys: list[torch.Tensor]  # per layer [B, kv heads, S', head dim]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [B, S'] bool
    bias: torch.Tensor | None  # [B, S'] additive attention weights (merged tokens), or None
    next_position: torch.Tensor  # [..., B, 1]: the positions of the first generated token


def unsupported(adapter: Any) -> str | None:
    """Why the decode step cannot serve this model exactly (None: it can)."""
    text = adapter.text_config
    implementation = getattr(text, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager", "edgelmm_probe"):
        return f"attention implementation '{implementation}' (the step passes an additive mask: sdpa or eager)"
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layers of kinds {sorted(layer_types)} (sliding-window or hybrid attention)"
    if getattr(text, "use_sliding_window", False) or (getattr(text, "sliding_window", None) and
                                                       "use_sliding_window" not in text.to_dict()):
        return "sliding-window attention"
    forward = inspect.signature(adapter.language_model().forward).parameters
    if "position_ids" not in forward or not ({"cache", "past_key_values"} & set(forward)):
        return "a language model without position_ids and cache arguments"
    return None


def cache_length(needed: int, limit: int) -> int:
    """The buffer length for `needed` tokens: the next multiple of BUCKET, at most `limit`."""
    return min(limit, -(-needed // BUCKET) * BUCKET)


def sample(logits: torch.Tensor, sampled: bool, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B], their log-probabilities [B], top_n alternatives' ids and log-probabilities
    [B, top_n]) from logits [B, vocab], on the device, with no host synchronisation.

    Log-probabilities are the model's own (before temperature and truncation). Sampling divides
    by the temperature, keeps the top_k largest (0: all), then the smallest set whose probability
    reaches top_p, and draws by an exponential race (argmax of p / E with E ~ Exp(1), which picks
    index i with probability p_i)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if not sampled:
        tokens = logits.argmax(dim=-1)
    else:
        scaled, order = (logits / temperature).sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=logits.device)
        k = torch.where(top_k > 0, top_k, scaled.shape[-1])
        scaled = scaled.masked_fill(rank >= k, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
        choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
        tokens = order.gather(-1, choice)[:, 0]
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    if top_n:
        top_values, top_ids = logprobs.topk(top_n, dim=-1)
    else:
        top_values = top_ids = logprobs.new_zeros(logprobs.shape[0], 0)
    return tokens, chosen, top_ids, top_values


@dataclass
class _Step:
    """One decode step for a fixed (batch, cache length, sampling kind), with its buffers."""

    decoder: StaticDecoder
    batch: int
    length: int
    sampled: bool
    top_n: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    graph: Any = None
    failure: str | None = None  # why CUDA-graph capture was given up (the step then runs eagerly)
    warm: bool = False  # compiled and captured, where the decoder does (`_first_use`)

    def allocate(self, like: Prefilled, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Its buffers: the first `length` slots of the decoder's KV buffers (views), and its own small ones."""
        device = like.keys[0].device
        self.keys = [k[:, :, :self.length] for k in keys]
        self.values = [v[:, :, :self.length] for v in values]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros_like(like.next_position)
        self.token = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(self.batch, 1, 1, self.length, dtype=self.decoder.mask_dtype, device=device)
        self.temperature = torch.ones(1, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)
        self.top_p = torch.ones(1, device=device)
        self.cache = SlotCache(self.keys, self.values, self.slot)
        self.outputs: tuple[torch.Tensor, ...] = ()
        if self.decoder.compiled:  # one compilation for every cache length
            for tensor, dim in [(self.mask, 3), *((t, 2) for t in self.keys + self.values)]:
                torch._dynamo.mark_dynamic(tensor, dim)

    def load(self, pre: Prefilled, first: torch.Tensor, params: SamplingParams) -> None:
        """Start a request: its prefill cache into the buffers, its mask, positions and first token."""
        filled = pre.keys[0].shape[2]
        for buffer, source in zip(self.keys + self.values, pre.keys + pre.values):
            buffer[:, :, :filled].copy_(source)
        minimum = torch.finfo(self.mask.dtype).min
        head = torch.where(pre.valid, pre.bias if pre.bias is not None else 0.0, minimum).to(self.mask.dtype)
        self.mask.fill_(minimum)
        self.mask[:, 0, 0, :filled].copy_(head)
        self.slot.fill_(filled)
        self.position.copy_(pre.next_position)
        self.token.copy_(first[:, None])
        self.temperature.fill_(params.temperature or 1.0)
        self.top_k.fill_(params.top_k)
        self.top_p.fill_(params.top_p)

    def run(self) -> tuple[torch.Tensor, ...]:
        """The step: open the slot, one token through the language model, pick the next, advance."""
        decoder = self.decoder
        self.mask.index_fill_(3, self.slot, 0.0)
        logits = decoder.forward(self.token, self.mask, self.position, self.cache)
        tokens, chosen, top_ids, top_values = sample(logits, self.sampled, self.temperature, self.top_k, self.top_p, self.top_n)
        self.token.copy_(tokens[:, None])
        self.slot.add_(1)
        self.position.add_(1)
        return tokens, chosen, top_ids, top_values

    def capture(self) -> None:
        """Record the step as a CUDA graph (after warm-up runs that settle kernels and autotuning)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        state = (self.slot, self.position, self.token, self.mask)
        saved = [t.clone() for t in state]
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)  # each run advanced the slot: the capture starts where the request is
        graph = torch.cuda.CUDAGraph()
        # a memory pool of its own: steps are dropped (and their graphs freed) when buffers grow,
        # and a pool shared with a freed graph cannot take new captures
        with torch.cuda.graph(graph):
            self.outputs = self.run()
        for tensor, value in zip(state, saved):
            tensor.copy_(value)  # the capture ran the step once more: undo it
        self.graph = graph

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        return self.run()


class StaticDecoder:
    """Decoding for one loaded model: prefill, then steps (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, adapter: Any, device: torch.device, limit: int, graphs: bool = True,
                 compile: bool = False):
        self.model, self.adapter, self.device, self.limit = model, adapter, device, limit
        self.language_model = adapter.language_model()
        self.lm_head = adapter.lm_head()
        self.cache_argument = cache_argument(self.language_model)
        self.mask_dtype = next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.float32
        self.graphs = graphs and device.type == "cuda"
        self.steps: dict[tuple[int, int, bool, int], _Step] = {}
        self.buffers: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # per batch size: keys, values
        self.compiled = compile
        # inductor fuses the norms, rotary embedding, residual adds and small ops of the step; the
        # cache length is a dynamic dimension, so one compilation serves every length
        self.forward = torch.compile(self.logits, fullgraph=False) if compile else self.logits
        self.compile_failure: str | None = None
        self.last_path = "static"  # how the latest request's steps ran (see `path`)
        self.last_cached = 0  # prompt tokens the latest prefill took from the prefix cache

    def logits(self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """Next-token logits [B, vocab] of one token per row, writing its keys and values into `cache`."""
        out = self.language_model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                                  **{self.cache_argument: cache})
        return self.lm_head(out[0][:, -1])

    def uncompile(self, reason: str) -> None:
        """Give up compilation (recorded) and run the step's modules as they are."""
        self.compiled, self.forward, self.compile_failure = False, self.logits, reason

    def path(self, step: _Step | None) -> str:
        """How `step` runs: "cuda-graph" (captured) or "static" (eager), "+compiled" when inductor built it."""
        base = "cuda-graph" if step is not None and step.graph is not None else "static"
        return base + ("+compiled" if self.compiled else "")

    def fits(self, prompt_tokens: int, new_tokens: int) -> bool:
        return prompt_tokens + new_tokens <= self.limit

    # ------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, inputs: dict[str, torch.Tensor], prefix: Any = None, images: Any = ()) -> Prefilled:
        """The model's own forward over the prompts (images, pruning hooks and all), through the
        `prefix` cache where one is given (backends/prefix_cache.py)."""
        seen: dict[str, Any] = {}

        def note_positions(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen.setdefault("positions", kwargs.get("position_ids"))

        hook = self.language_model.register_forward_pre_hook(note_positions, with_kwargs=True)
        try:
            out, self.last_cached = cached_forward(self.model, self.adapter, inputs, prefix, images, logits_to_keep=1)
        finally:
            hook.remove()
        cache = output_cache(out)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        length, filled = ids.shape[1], keys[0].shape[2]
        positions = seen.get("positions")
        last = positions[..., -1:] if isinstance(positions, torch.Tensor) else torch.full(
            (ids.shape[0], 1), length - 1, device=ids.device, dtype=torch.long)
        layout = None
        pruning = pruning_of(self.model)
        if pruning is not None and filled != length:
            layout = pruning.cache_layout(cache)
        if layout is not None:
            valid = mask.gather(1, layout.keep) & layout.alive
            bias = None if layout.weight is None else layout.weight.log()
            last = layout.last_position
        else:
            valid, bias = mask, None
        return Prefilled(out.logits[:, -1].float(), keys, values, valid, bias, last + 1)

    # ------------------------------------------------------------ decode
    def _step(self, pre: Prefilled, new_tokens: int, params: SamplingParams) -> _Step:
        batch, filled = pre.keys[0].shape[0], pre.keys[0].shape[2]
        length = cache_length(filled + new_tokens, self.limit)
        top_n = params.top_logprobs
        key = (batch, length, not params.greedy, top_n)
        step = self.steps.get(key)
        if step is None:
            keys, values = self._buffers(pre, length)
            step = _Step(self, batch, length, not params.greedy, top_n)
            step.allocate(pre, keys, values)
            self.steps[key] = step
        return step

    def _buffers(self, pre: Prefilled, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The KV buffers for `pre`'s batch size, at least `length` slots long. One set is kept per
        batch size (the last MAX_BATCH_SIZES used), shared by every cache length's step as views;
        a longer need reallocates it (doubling, up to the limit) and drops the steps built on it."""
        batch = pre.keys[0].shape[0]
        held = self.buffers.pop(batch, None)
        had = 0 if held is None else held[0][0].shape[2]
        if held is not None and had < length:
            self._drop(batch)
            held = None
        if held is None:
            while len(self.buffers) >= MAX_BATCH_SIZES:
                self._drop(next(iter(self.buffers)))
            size = min(self.limit, max(length, 2 * had))
            try:
                held = ([pre.keys[0].new_zeros(batch, k.shape[1], size, k.shape[3]) for k in pre.keys],
                        [pre.values[0].new_zeros(batch, v.shape[1], size, v.shape[3]) for v in pre.values])
            except torch.OutOfMemoryError:
                per_token = sum(k.shape[1] * k.shape[3] * k.element_size() for k in pre.keys + pre.values)
                raise EdgelmmError(
                    f"not enough device memory for a decode cache of {batch} x {size} tokens "
                    f"({batch * size * per_token / 2**30:.2f} GiB)",
                    "ask for fewer new tokens or a smaller batch, or load with options: {max_cache_tokens: N}") from None
        self.buffers[batch] = held  # most recently used last
        return held

    def _drop(self, batch: int) -> None:
        """Forget the buffers of one batch size and the steps (and graphs) that use them."""
        self.buffers.pop(batch, None)
        for key in [k for k in self.steps if k[0] == batch]:
            del self.steps[key]

    @torch.inference_mode()
    def decode(self, pre: Prefilled, new_tokens: int, params: SamplingParams,
               stop: Callable[[], bool]) -> Iterator[tuple[list[int], list[float], list[list[tuple[int, float]]]]]:
        """Per generated token: (token per row, its log-probability, its top alternatives).
        `stop()` is asked after each token; generation ends when it says so or after new_tokens."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        temperature = torch.full((1,), params.temperature or 1.0, device=self.device)
        top_k = torch.full((1,), params.top_k, dtype=torch.long, device=self.device)
        top_p = torch.full((1,), params.top_p, device=self.device)
        first = sample(pre.logits, not params.greedy, temperature, top_k, top_p, params.top_logprobs)
        self.last_path = self.path(None)
        yield _host(first)
        if new_tokens <= 1 or stop():
            return
        step = self._step(pre, new_tokens, params)
        step.load(pre, first[0], params)
        if not step.warm:
            self._first_use(step, lambda: step.load(pre, first[0], params))
        self.last_path = self.path(step)
        remaining = new_tokens - 1
        if self.device.type != "cuda":
            for _ in range(remaining):
                yield _host(step())
                if stop():
                    return
            return
        yield from self._pipelined(step, remaining, stop)

    def _first_use(self, step: _Step, reset: Callable[[], None]) -> None:
        """Compile the step (its first call) and capture it, where the decoder does; a failure of
        either is recorded and leaves the step running without it. `reset` reloads the request
        after a run that advanced the step (a capture restores what it ran itself)."""
        if self.compiled:
            try:
                step.run()
            except Exception as exc:  # noqa: BLE001 - inductor's errors have no common type
                self.uncompile(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            reset()
        if self.graphs:
            try:
                step.capture()
            except RuntimeError as exc:  # a model whose step syncs with the host: run it eagerly
                step.failure = str(exc).splitlines()[0]
                step.graph = None
                torch.cuda.synchronize(self.device)
                reset()
        step.warm = True

    def _pipelined(self, step: _Step, count: int, stop: Callable[[], bool]) -> Iterator[Any]:
        """Keep one step queued on the GPU while the host reads the one before (pinned copies)."""
        pinned = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in _shapes(step)) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]

        def launch(i: int) -> None:
            outputs = step()
            for host, device in zip(pinned[i % 2], outputs):
                host.copy_(device, non_blocking=True)
            events[i % 2].record()

        launch(0)
        for i in range(count):
            if i + 1 < count:
                launch(i + 1)
            events[i % 2].synchronize()
            yield _host(pinned[i % 2])
            if stop():
                torch.cuda.current_stream().synchronize()  # the queued step is done before buffers move on
                return


def _shapes(step: _Step) -> tuple[torch.Tensor, ...]:
    """Tensors shaped like the step's outputs (for the host-side copies)."""
    batch = step.batch
    device = step.token.device
    return (torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, device=device),
            torch.zeros(batch, step.top_n, dtype=torch.long, device=device), torch.zeros(batch, step.top_n, device=device))


def _host(outputs: tuple[torch.Tensor, ...]) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    tokens, chosen, top_ids, top_values = (t.tolist() for t in outputs)
    return tokens, chosen, [list(zip(i, v)) for i, v in zip(top_ids, top_values)]
