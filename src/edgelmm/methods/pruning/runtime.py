"""Dropping visual tokens inside a running transformers model, through its adapter only.

`prune(model, adapter, pruner)` attaches hooks; the model is then used as before (`generate`,
`stream`, a plain forward), and every family's own input handling stays in charge: the
processor's image tokens, the vision tower, M-RoPE and deepstack inputs, generate's positions.

One request, step by step:

1. Model call with an empty cache and image tokens in `input_ids` (a prefill): the hooks note
   where the image tokens are. Calls without image tokens are left alone (a documented no-op).
2. The model runs its vision tower (a vision probe may read one layer's attention) and computes
   its input embeddings and position ids — 3-D M-RoPE ones included — as it always does.
3. Decoder layers 0..k-1 run on the full sequence (for FastV a probe in layer k-1 reads the last
   prompt token's attention). Before layer k the pruner picks the visual tokens to keep; the
   hidden states, the attention mask, the rotary cos/sin and the position ids the layers receive
   are cut to the kept positions, and the KV cache of layers 0..k-1 is cut the same way. Layers
   k.. then run on the shorter sequence and cache only kept tokens.
4. Decode steps: generate keeps a 2-D attention mask over the original prompt and positions that
   continue the original sequence (so Qwen2-VL's rope deltas stay right); the hooks drop the
   pruned columns from the mask so that it matches the shorter cache, and, where a caller passes
   no positions, continue the ones the prefill had.

Methods that merge tokens may ask for proportional attention (ToMe): a kept token standing for m
tokens gets log(m) added to its attention logits, through an additive mask at prefill (layers k..)
and a 4-D one at every decode step.

Rows of a batch keep the same number of tokens (tensors are rectangular). Where requests have
different numbers of visual tokens, each keeps its own share and the rows that drop more carry
the difference as masked slots: never attended, never in the decode mask.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import DynamicLayer

from edgelmm.errors import EdgelmmError
from edgelmm.methods.pruning.base import Pruner, Selection, VisualTokens
from edgelmm.methods.pruning.probes import AttentionProbe, last_query_attention, vision_attention
from edgelmm.models.base import ModelAdapter

_ATTRIBUTE = "_edgelmm_pruning"
_CACHE_KEYS = ("cache", "past_key_values")  # the cache argument's name in newer transformers / in 5.17


@dataclass
class PruneStats:
    """Token counts of the last pruned prefill (the KV cache holds `kept_tokens` per row)."""

    prompt_tokens: int  # sequence length before pruning, left padding included
    kept_tokens: int  # sequence length after
    visual_tokens: list[int]  # per row
    kept_visual: list[int]  # per row
    kept_positions: torch.Tensor  # [B, kept_tokens] prompt positions that stayed (dead slots included)


@dataclass
class CacheLayout:
    """A pruned prefill's cache: which prompt positions its entries hold and how to attend to them."""

    keep: torch.Tensor  # [B, S'] the prompt position of each cache entry
    alive: torch.Tensor  # [B, S'] False at dead slots (never attended)
    weight: torch.Tensor | None  # [B, S'] tokens each entry stands for (proportional attention), or None
    last_position: torch.Tensor  # [..., B, 1] the position of the last prompt token (original numbering)


@dataclass
class _Cut:
    """How the prefill sequence was cut: the same for every layer from k on."""

    keep: torch.Tensor  # [B, S'] kept sequence positions, ascending
    alive: torch.Tensor  # [B, S'] False at slots kept only to keep rows the same length
    visual: torch.Tensor  # [B, S'] True at visual slots
    reduce_visual: list[Callable[[torch.Tensor], torch.Tensor]]  # per row: [n, ...] visual rows -> [n', ...]
    weight: torch.Tensor | None = None  # [B, S'] tokens each slot stands for, under proportional attention


@dataclass
class _Request:
    """The prefill in flight; lives from the model call to the end of its language-model forward."""

    image_mask: torch.Tensor  # [B, S]
    lm_scores: torch.Tensor | None = None  # [B, S]
    injections: list[torch.Tensor] = field(default_factory=list)
    started: bool = False  # the language model has been entered
    cut: _Cut | None = None
    layer_kwargs: dict[tuple[str, int], Any] = field(default_factory=dict)  # cut layer inputs by original object
    last_position: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # of the hidden states, for additive masks


@dataclass
class _Decode:
    """What the decode steps of a pruned request need: the cut, and where positions continue."""

    cache: Any  # weak reference to the cache the prefill filled
    keep: torch.Tensor
    alive: torch.Tensor
    prompt_tokens: int
    last_position: torch.Tensor | None
    weight: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def step(self, kwargs: dict[str, Any], past: int, new: int) -> dict[str, Any]:
        """One decode call's arguments: the mask cut as the cache was; positions continued where
        the caller gives none."""
        mask = kwargs.get("attention_mask")
        full = self.prompt_tokens + past - self.keep.shape[1] + new  # a mask over the uncut prompt
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == full:
            head = mask[:, : self.prompt_tokens].gather(1, self.keep.to(mask.device)) * self.alive.to(mask.device)
            kwargs["attention_mask"] = torch.cat([head.to(mask.dtype), mask[:, self.prompt_tokens :]], dim=1)
        elif mask is None and not bool(self.alive.all()):  # dead slots must stay masked
            tail = self.alive.new_ones(self.alive.shape[0], past - self.keep.shape[1] + new)
            kwargs["attention_mask"] = torch.cat([self.alive, tail], dim=1).long()
        if self.weight is not None:
            kwargs["attention_mask"] = self._weighted(kwargs.get("attention_mask"), past, new)
        if kwargs.get("position_ids") is None and self.last_position is not None:
            step = torch.arange(1, new + 1, device=self.last_position.device)
            kwargs["position_ids"] = self.last_position + step
        if kwargs.get("position_ids") is not None:
            self.last_position = kwargs["position_ids"][..., -1:]
        return kwargs

    def _weighted(self, mask: torch.Tensor | None, past: int, new: int) -> torch.Tensor:
        """The 4-D additive mask of a decode step under proportional attention (a 4-D mask is
        used by the model as given)."""
        batch, kept = self.keep.shape
        if mask is None:
            mask = self.keep.new_ones(batch, past + new)
        bias = torch.cat([self.weight.log(), self.weight.new_zeros(batch, past - kept + new)], dim=1)
        rows = torch.arange(new, device=mask.device)[:, None] + past >= torch.arange(past + new, device=mask.device)
        allowed = mask.bool()[:, None, None, :] & rows[None, None]
        return torch.where(allowed, bias[:, None, None, :], torch.finfo(self.dtype).min).to(self.dtype)


class Pruning:
    """One pruner attached to one model: its hooks, its probes and the request in flight."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, pruner: Pruner):
        if not adapter.multimodal:
            raise pruner.error(
                f"'{adapter.config.model_type}' is a text-only language model: it has no visual tokens to prune",
                "load a vision-language model, or drop the pruning method",
            )
        layers = adapter.language_layers()
        pruner.check_model(len(layers))
        implementation = adapter.text_config._attn_implementation or "eager"
        if "flex" in implementation:
            raise pruner.error(
                f"attention implementation '{implementation}' is not supported", "load with sdpa, eager or flash attention"
            )
        if pruner.proportional_attention and "flash" in implementation:
            raise pruner.error("proportional attention needs an additive mask, which flash attention takes none of",
                               "load with sdpa or eager attention, or set proportional=False")
        tower = vision = None
        if pruner.uses_vision_attention:
            tower, vision = adapter.vision_tower(), adapter.vision_attention()
            if tower is None or vision is None:
                raise pruner.error(f"the {adapter.family} adapter names no vision-encoder attention to score tokens by")
            self._cls_only = pruner.vision_queries(adapter) == "cls"
            self._tower_signature = inspect.signature(tower.forward)
        self.model, self.adapter, self.pruner = model, adapter, pruner
        self.implementation = implementation
        self.layers = layers
        self.last: PruneStats | None = None
        self._request: _Request | None = None
        self._decode: _Decode | None = None
        self._armed: list[RemovableHandle] = []  # hooks that live for one prefill
        # The vision side is read whenever the tower runs: transformers 5.2x generate encodes the
        # images before the first model call, older ones inside it. A cut uses (and clears) the
        # scores of the tower's last run.
        self._vision_scores: list[torch.Tensor] = []
        self._tower_inputs: dict[str, Any] = {}
        lm = adapter.language_model()
        self._hooks = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            lm.register_forward_pre_hook(self._before_lm, with_kwargs=True),
            lm.register_forward_hook(self._after_lm),
        ]
        self._probes: list[AttentionProbe] = []
        try:
            if pruner.uses_lm_attention:
                self._probes.append(AttentionProbe(adapter.attention(pruner.k - 1), self._observe_lm))
            if tower is not None:
                self._hooks.append(tower.register_forward_pre_hook(self._before_tower, with_kwargs=True))
                self._probes.append(AttentionProbe(vision, self._observe_vision))
        except BaseException:
            self.remove()
            raise

    def cache_layout(self, cache: Any) -> CacheLayout | None:
        """How the last pruned prefill laid out `cache` (None when it did not fill this cache):
        for a decode loop of its own that continues it (the torch backend's decode engine)."""
        decode = self._decode
        if decode is None or decode.cache() is not cache:
            return None
        return CacheLayout(decode.keep, decode.alive, decode.weight, decode.last_position)

    def remove(self) -> None:
        self._disarm()
        for handle in self._hooks:
            handle.remove()
        for probe in self._probes:
            probe.remove()
        self._request = self._decode = None

    # ------------------------------------------------------------ model and language-model calls
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._disarm()  # leftovers of a forward that raised
        self._request = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._decode = None
            if isinstance(ids, torch.Tensor) and ids.shape[-1] > 1:
                image = self.adapter.image_token_mask(ids)
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    image = image & mask.bool()
                if bool(image.any()):
                    self._request = _Request(image)
            return None
        decode = self._decode
        if decode is None or decode.cache() is not cache or ids is None:
            return None
        return args, decode.step(kwargs, past, ids.shape[-1])

    def _before_lm(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        request = self._request
        if request is None or request.started:
            return None
        request.started = True
        request.injections = self.adapter.take_visual_injections(kwargs)
        positions = kwargs.get("position_ids")
        request.last_position = positions[..., -1:] if isinstance(positions, torch.Tensor) else None
        for i in range(self.pruner.k, len(self.layers)):
            self._armed.append(self.layers[i].register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
        for i in range(len(request.injections)):
            self._armed.append(self.layers[i].register_forward_hook(self._layer_output(i)))
        return args, kwargs

    def _after_lm(self, module: nn.Module, args: tuple, output: Any) -> None:
        request, self._request = self._request, None
        self._disarm()
        if request is None or request.cut is None:
            return
        cut = request.cut
        fields = output if isinstance(output, dict) else {}  # a ModelOutput: its set fields, no deprecated aliases
        cache = next((fields[k] for k in _CACHE_KEYS if fields.get(k) is not None), None)
        if cache is not None:
            last = request.last_position
            if last is None:  # the model counted positions itself: 0..S-1
                last = torch.full((cut.keep.shape[0], 1), request.image_mask.shape[1] - 1, device=cut.keep.device)
            self._decode = _Decode(weakref.ref(cache), cut.keep, cut.alive, request.image_mask.shape[1], last,
                                   cut.weight, request.dtype)

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed.clear()

    # ------------------------------------------------------------ decoder layers
    def _layer_input(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            request = self._request
            if request is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == self.pruner.k:
                hidden = self._cut(request, hidden, kwargs)
            for name in ("attention_mask", "position_embeddings", "position_ids"):
                if name in kwargs:
                    kwargs[name] = self._cut_input(request, name, kwargs[name])
            return (hidden, *args[1:]), kwargs

        return hook

    def _layer_output(self, i: int) -> Callable[..., Any]:
        """Adds the i-th injection (Qwen3-VL deepstack) exactly as the model itself would, at the
        visual positions of the sequence as it is now."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            request = self._request
            visual = request.image_mask if request.cut is None else request.cut.visual
            hidden = output.clone()
            hidden[visual, :] = hidden[visual, :] + request.injections[i].to(hidden.device, hidden.dtype)
            return hidden

        return hook

    # ------------------------------------------------------------ the cut
    def _cut(self, request: _Request, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Select per row, cut the hidden states and the caches of layers 0..k-1; return the new hidden states."""
        image = request.image_mask.to(hidden.device)
        counts = image.sum(dim=1).tolist()
        vision = self._vision_per_token(counts) if self.pruner.uses_vision_attention else None
        if self.pruner.uses_lm_attention and request.lm_scores is None:
            raise self.pruner.error(f"decoder layer {self.pruner.k - 1} ran without its attention being scored")
        selections = []
        for row, positions in enumerate(image.nonzero()[:, 1].split(counts)):
            visual = VisualTokens(
                positions=positions,
                hidden=hidden[row, positions],
                lm_attention=None if request.lm_scores is None else request.lm_scores[row, positions],
                vision_attention=None if vision is None else vision[row],
                row=row,
            )
            selections.append(self._select(visual))
        cut = _plan(image, selections, self.pruner.proportional_attention)
        request.cut = cut
        request.dtype = hidden.dtype
        width = hidden.shape[-1]
        new = hidden.gather(1, cut.keep[..., None].expand(-1, -1, width))
        for row, positions in enumerate(image.nonzero()[:, 1].split(counts)):
            if selections[row].merge_into is not None:
                new[row, cut.visual[row]] = cut.reduce_visual[row](hidden[row, positions])
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        request.injections = [
            torch.cat([reduce(x[a:b]) for reduce, a, b in zip(cut.reduce_visual, offsets, offsets[1:])])
            for x in request.injections
        ]
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        if cache is not None:
            other = next((type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer), None)
            if other is not None:
                raise self.pruner.error(
                    f"the KV cache has a {other}; pruning works on transformers' DynamicCache only",
                    "generate with the default cache (no cache_implementation)",
                )
            for layer in cache.layers[: self.pruner.k]:
                index = cut.keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.last = PruneStats(
            prompt_tokens=image.shape[1], kept_tokens=cut.keep.shape[1], visual_tokens=counts,
            kept_visual=(cut.visual & cut.alive).sum(dim=1).tolist(), kept_positions=cut.keep,
        )
        return new

    def _select(self, visual: VisualTokens) -> Selection:
        n = len(visual)
        n_keep = self.pruner.n_keep(n) if n else 0
        chosen = self.pruner.select(visual, n_keep) if n_keep else visual.positions[:0]
        selection = chosen if isinstance(chosen, Selection) else Selection(chosen)
        keep = selection.keep.to(visual.positions.device).long()
        in_range = n_keep == 0 or 0 <= int(keep.min()) <= int(keep.max()) < n
        if keep.numel() != n_keep or keep.unique().numel() != n_keep or not in_range:
            raise self.pruner.error(f"select() must return {n_keep} distinct indices in 0..{n - 1}, got {keep.tolist()}")
        return Selection(keep, selection.merge_into)

    def _cut_input(self, request: _Request, name: str, value: Any) -> Any:
        """A layer input cut to the kept positions, once per original object (the full and the
        sliding-window masks of a model stay apart)."""
        key = (name, id(value))
        if key not in request.layer_kwargs:
            cut = request.cut
            if name == "attention_mask":
                mask = _cut_mask(value, cut, self.implementation)
                request.layer_kwargs[key] = mask if cut.weight is None else _weigh(mask, cut, request.dtype)
            elif name == "position_embeddings":
                request.layer_kwargs[key] = tuple(_gather_sequence(t, cut.keep, dim=-2) for t in value)
            else:
                request.layer_kwargs[key] = None if value is None else _gather_sequence(value, cut.keep, dim=-1)
        return request.layer_kwargs[key]

    # ------------------------------------------------------------ scores
    def _observe_lm(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        request = self._request
        if request is not None and request.started and request.cut is None:
            request.lm_scores = last_query_attention(query, key, mask, scaling)

    def _before_tower(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._tower_inputs = self._tower_signature.bind_partial(*args, **kwargs).arguments
        self._vision_scores = []

    def _observe_vision(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        self._vision_scores.append(vision_attention(query, key, mask, scaling, self._cls_only))

    def _vision_per_token(self, counts: list[int]) -> list[torch.Tensor]:
        """Per row, the vision attention each visual token's patches received (summed over them)."""
        scores, self._vision_scores = self._vision_scores, []
        if not scores:
            raise self.pruner.error(
                "no vision-encoder attention was seen for this request",
                "pass pixel values (image features given as embeddings cannot be scored)",
            )
        scores = torch.cat([s.flatten() for s in scores])
        index = self.adapter.vision_token_map(self._tower_inputs, scores.numel()).to(scores.device)
        fed = index >= 0
        if int(index.max()) + 1 != sum(counts):
            raise self.pruner.error(
                f"the vision encoder's last run fed {int(index.max()) + 1} visual tokens, the prompt has {sum(counts)}",
                "run the vision tower on this request's images (pass pixel values)",
            )
        per_token = scores.new_zeros(sum(counts)).index_add_(0, index[fed], scores[fed])
        return list(per_token.split(counts))


# ---------------------------------------------------------------- tensors


def _plan(image: torch.Tensor, selections: list[Selection], proportional: bool = False) -> _Cut:
    """Kept positions per row; rows dropping more than the least-dropping row keep that many of
    their dropped tokens as dead slots, so that every row has the same length. With
    `proportional`, each slot's weight is the number of tokens merged into it (at least 1)."""
    counts = image.sum(dim=1).tolist()
    dropped = [n - s.keep.numel() for n, s in zip(counts, selections)]
    spare = min(dropped)
    keeps, alives, reducers, weights = [], [], [], []
    for row, (selection, positions) in enumerate(zip(selections, image.nonzero()[:, 1].split(counts))):
        kept = torch.zeros(counts[row], dtype=torch.bool, device=image.device)
        kept[selection.keep] = True
        dead = (~kept).nonzero()[:, 0][: dropped[row] - spare]
        slots = torch.cat([selection.keep, dead]).sort().values  # visual tokens that keep a slot
        alive_visual = torch.ones_like(slots, dtype=torch.bool)
        alive_visual[torch.isin(slots, dead)] = False
        sequence = torch.cat([(~image[row]).nonzero()[:, 0], positions[slots]])
        order = sequence.argsort()
        keeps.append(sequence[order])
        alive_text = torch.ones(image.shape[1] - counts[row], dtype=torch.bool, device=image.device)
        alives.append(torch.cat([alive_text, alive_visual])[order])
        reducer, sizes = _visual_reducer(slots, selection)
        reducers.append(reducer)
        weights.append(torch.cat([alive_text.float(), sizes.clamp(min=1).float()])[order])
    keep = torch.stack(keeps)
    weight = torch.stack(weights) if proportional else None
    if weight is not None and bool((weight == 1).all()):  # nothing merged: the plain masks stay exact
        weight = None
    return _Cut(keep, torch.stack(alives), image.gather(1, keep), reducers, weight)


def _visual_reducer(slots: torch.Tensor, selection: Selection) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """[n, ...] rows of a request's visual tokens -> [n', ...] rows of its visual slots, where a
    kept token absorbing others (merge_into) becomes their mean; and how many tokens each slot
    absorbed (0 for one that absorbed none)."""
    merge_into = selection.merge_into
    if merge_into is None:
        return (lambda rows: rows[slots]), torch.zeros_like(slots)
    slot_of_keep = torch.searchsorted(slots, selection.keep)
    merge_into = merge_into.to(slots.device).long()
    member = merge_into >= 0
    target = slot_of_keep[merge_into[member]]
    sizes = torch.bincount(target, minlength=slots.numel())

    def reduce(rows: torch.Tensor) -> torch.Tensor:
        out = rows[slots].clone()
        sums = torch.zeros((slots.numel(), *rows.shape[1:]), dtype=torch.float32, device=rows.device)
        sums.index_add_(0, target, rows[member].float())
        merged = sizes > 0
        shape = (-1, *[1] * (rows.dim() - 1))
        out[merged] = (sums[merged] / sizes[merged].view(shape)).to(rows.dtype)
        return out

    return reduce, sizes


def _gather_sequence(t: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Cut a per-position tensor whose batch axis sits just before `dim` ([B, S], [3, B, S],
    [B, S, D], [3, B, S, D]); a batch axis of 1 (shared positions) is widened first."""
    dim = dim % t.dim()
    batch, width = keep.shape
    shape = list(t.shape)
    shape[dim - 1] = batch
    t = t.expand(shape)
    index_shape = [1] * t.dim()
    index_shape[dim - 1], index_shape[dim] = batch, width
    shape[dim] = width
    return t.gather(dim, keep.view(index_shape).expand(shape))


def _cut_mask(mask: Any, cut: _Cut, implementation: str) -> Any:
    """The attention mask of the kept positions, with dead slots masked as keys.

    None (causal, nothing padded) stays None when every slot is alive, so SDPA keeps its
    is_causal fast path; 4-D masks ([B, 1, q, kv], boolean or additive) lose rows and columns;
    flash attention's 2-D padding mask loses columns."""
    keep, alive = cut.keep, cut.alive
    all_alive = bool(alive.all())
    if mask is None:
        if all_alive:
            return None
        if "flash" in implementation:
            return alive.long()
        length = keep.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
        return causal[None, None] & alive[:, None, None, :]  # SDPA's boolean form; eager never passes None
    if not isinstance(mask, torch.Tensor):
        raise EdgelmmError(
            f"pruning cannot cut an attention mask of type {type(mask).__name__}", "load with sdpa, eager or flash attention"
        )
    if mask.dim() == 2:
        return mask.gather(1, keep) * alive.to(mask.dtype)
    batch, heads, width = keep.shape[0], mask.shape[1], keep.shape[1]
    mask = mask.expand(batch, -1, -1, -1)
    rows = mask.gather(2, keep[:, None, :, None].expand(batch, heads, width, mask.shape[3]))
    cut_mask = rows.gather(3, keep[:, None, None, :].expand(batch, heads, width, width))
    if all_alive:
        return cut_mask
    dead = ~alive[:, None, None, :]
    if cut_mask.dtype == torch.bool:
        return cut_mask & ~dead
    return cut_mask.masked_fill(dead, torch.finfo(cut_mask.dtype).min)


def _weigh(mask: torch.Tensor | None, cut: _Cut, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention (as in ToMe): a slot standing for m merged tokens gets log(m) added
    to its attention logits, so the softmax gives it about the share the m tokens had together."""
    if mask is None:
        length = cut.keep.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=cut.keep.device).tril()[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype) + cut.weight.log().to(dtype)[:, None, None, :]


# ---------------------------------------------------------------- the verbs


def prune(model: nn.Module, adapter: ModelAdapter, pruner: Pruner) -> nn.Module:
    """Attach `pruner` to `model` (in place) and return it; generation then drops visual tokens.

    Raises for a text-only model, a layer index beyond the model, a model already pruned.
    """
    if getattr(model, _ATTRIBUTE, None) is not None:
        current = getattr(model, _ATTRIBUTE).pruner
        raise pruner.error(f"the model is already pruned by {current}", "unprune(model) first")
    setattr(model, _ATTRIBUTE, Pruning(model, adapter, pruner))
    return model


def unprune(model: nn.Module) -> nn.Module:
    """Detach the pruning from `model`; it then runs exactly as before `prune`."""
    pruning = getattr(model, _ATTRIBUTE, None)
    if pruning is not None:
        pruning.remove()
        setattr(model, _ATTRIBUTE, None)
    return model


def pruning_of(model: nn.Module) -> Pruning | None:
    """The pruning attached to `model` (its pruner, and `last`: the last prefill's token counts)."""
    return getattr(model, _ATTRIBUTE, None)
