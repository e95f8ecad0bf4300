"""A prefix cache for the torch backend: prompts' KV blocks in a radix tree, reused by later prompts.

    cache = PrefixCache(budget_bytes=256 * 2**20)        # options: {prefix_cache_mb: 256}
    hit = cache.lookup(keys)                             # the longest cached run of whole blocks
    ... prefill only keys[hit.tokens:] on top of hit.layers() ...
    cache.insert(keys, dynamic_cache)                    # the prompt's new blocks join the tree

A prompt is keyed position by position: a text token by its id, an image token by its image's
content hash and its place in that image, so that the same picture shares blocks wherever it
appears and another picture never does. Keys are cut into blocks of `block` positions; each tree
node holds one block's keys and values for every layer, below the node of the block before it.
A prompt's last, shorter block is kept as a leaf too. A lookup walks down from the root as far as
blocks match (a short leaf matches the start of a block): that prefix's KV is reused, and only
the rest of the prompt is prefilled. Nodes are evicted least recently used first, leaves
only (a node's children need it), down to 90 % of the budget once the bytes held pass it.

What a hit may cover: it never ends inside the prompt's images (a partly cached image would need
its pixels split; the hit is cut back to before the first image instead) and always leaves one
token to prefill (the logits of the last one are needed). Families whose positions depend on the
whole prompt's image layout (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) are not served by it.

`save` / `load` write the tree to one safetensors file (keys and tree in its metadata), so that
an edge device's cached conversations survive a restart.
"""

from __future__ import annotations

import inspect
import itertools
import json
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from edgelmm.backends.cache_keys import prompt_keys
from edgelmm.errors import EdgelmmError

FORMAT = "edgelmm-prefix-cache"


@dataclass(eq=False)
class _Node:
    block: tuple[Hashable, ...]
    parent: _Node | None
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv heads, block, head dim]
    values: list[torch.Tensor] = field(default_factory=list)
    children: dict[tuple[Hashable, ...], _Node] = field(default_factory=dict)
    short: dict[tuple[Hashable, ...], _Node] = field(default_factory=dict)  # the children of fewer than `block` keys
    used: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class Hit:
    tokens: int  # positions of the prompt whose KV is reused
    nodes: list[_Node]
    text_rest: bool = False  # set by `lookup`: no image token after the reused positions

    def cache(self) -> DynamicCache:
        """The hit's KV as a fresh DynamicCache (batch of one), ready to be extended."""
        cache = DynamicCache()
        if self.nodes:
            for layer in range(len(self.nodes[0].keys)):
                keys = torch.cat([n.keys[layer] for n in self.nodes], dim=1)[None, :, : self.tokens]
                values = torch.cat([n.values[layer] for n in self.nodes], dim=1)[None, :, : self.tokens]
                cache.update(keys.contiguous(), values.contiguous(), layer)
        return cache


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16):
        if budget_bytes <= 0 or block <= 0:
            raise EdgelmmError("a prefix cache needs a positive byte budget and block size")
        self.budget, self.block = budget_bytes, block
        self.root = _Node((), None)
        self.nbytes = 0
        self.hits = self.misses = self.evictions = self.hit_tokens = self.lookup_tokens = 0
        self._clock = itertools.count(1)

    def _blocks(self, keys: Sequence[Hashable]) -> list[tuple[Hashable, ...]]:
        """Whole blocks, then the short rest (held as a leaf: a prompt's last tokens are worth keeping)."""
        return [tuple(keys[i: i + self.block]) for i in range(0, len(keys), self.block)]

    def lookup(self, keys: Sequence[Hashable], image_mask: Sequence[bool]) -> Hit:
        """The longest usable cached prefix of a prompt (see the module doc for what it may cover)."""
        nodes, node, matched = [], self.root, 0
        for block in self._blocks(keys):
            child = node.children.get(block)
            if child is None:  # a shorter leaf may still begin this block
                child = next((c for c in node.short.values()
                              if len(c.block) < len(block) and block[: len(c.block)] == c.block), None)
            if child is None:
                break
            nodes.append(child)
            matched += len(child.block)
            if len(child.block) < self.block:
                break
            node = child
        tokens = min(matched, len(keys) - 1)  # one token is always prefilled: its logits are needed
        images = [i for i, m in enumerate(image_mask) if m]
        if images and images[0] < tokens <= images[-1]:
            tokens = images[0]  # never into the middle of the images
        nodes = nodes[: -(-tokens // self.block)] if tokens else []
        tick = next(self._clock)
        for n in nodes:
            n.used = tick
        self.lookup_tokens += len(keys)
        if tokens:
            self.hits += 1
            self.hit_tokens += tokens
        else:
            self.misses += 1
        return Hit(tokens, nodes)

    def insert(self, keys: Sequence[Hashable], cache: Any) -> None:
        """Add the blocks of a prefilled prompt (its DynamicCache, batch of one) that the tree
        lacks, then evict down to the budget."""
        layers = cache.layers
        node, tick, start = self.root, next(self._clock), 0
        for block in self._blocks(keys):
            span = slice(start, start + len(block))
            start = span.stop
            child = node.children.get(block)
            if child is None:
                if layers[0].keys.shape[2] < span.stop:
                    break  # the cache is shorter than the keys (it was not the whole prompt)
                child = _Node(block, node, [lay.keys[0, :, span].clone() for lay in layers],
                              [lay.values[0, :, span].clone() for lay in layers])
                node.children[block] = child
                if len(block) < self.block:
                    node.short[block] = child
                self.nbytes += child.nbytes
            child.used = tick
            node = child
        self._evict(keep=node)

    def _evict(self, keep: _Node | None = None) -> None:
        """Past the budget, evict least recently used leaves down to 90 % of it (so that the tree
        is walked once per many inserts, not once per block); the newest prompt's leaf goes last."""
        while self.nbytes > self.budget:
            leaves = sorted((n for n in self._nodes() if not n.children), key=lambda n: (n is keep, n.used))
            if not leaves:
                break
            for leaf in leaves:
                if self.nbytes <= 0.9 * self.budget:
                    return
                self._remove(leaf)

    def _remove(self, node: _Node) -> None:
        assert node.parent is not None
        del node.parent.children[node.block]
        node.parent.short.pop(node.block, None)
        self.nbytes -= node.nbytes
        self.evictions += 1

    def _nodes(self) -> list[_Node]:
        out, todo = [], list(self.root.children.values())
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.children.values())
        return out

    def stats(self) -> dict[str, Any]:
        return {"blocks": len(self._nodes()), "bytes": self.nbytes, "budget_bytes": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "hit_tokens": self.hit_tokens,
                "lookup_tokens": self.lookup_tokens}

    # ------------------------------------------------------------ to disk and back
    def save(self, path: str | Path) -> None:
        """The tree to one safetensors file, written atomically."""
        from safetensors.torch import save

        from edgelmm.utils.io import atomic_write_bytes

        nodes = self._nodes()
        index = {id(n): i for i, n in enumerate(nodes)}
        tensors, tree = {}, []
        for i, n in enumerate(nodes):
            for layer, (k, v) in enumerate(zip(n.keys, n.values)):
                tensors[f"{i}.{layer}.k"], tensors[f"{i}.{layer}.v"] = k.contiguous().cpu(), v.contiguous().cpu()
            tree.append({"parent": index.get(id(n.parent)), "block": [list(k) if isinstance(k, tuple) else k for k in n.block],
                         "used": n.used})
        meta = {"format": FORMAT, "block": str(self.block), "tree": json.dumps(tree)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> int:
        """Blocks from a file `save` wrote (added to what is held); how many were read."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise EdgelmmError(f"{path}: not an edgelmm prefix cache file", "give a file that save() wrote")
                if int(meta["block"]) != self.block:
                    raise EdgelmmError(f"{path}: blocks of {meta['block']} tokens, this cache uses {self.block}")
                tree = json.loads(meta["tree"])
                nodes: list[_Node] = []
                for i, entry in enumerate(tree):
                    parent = self.root if entry["parent"] is None else nodes[entry["parent"]]
                    block = tuple(tuple(k) if isinstance(k, list) else k for k in entry["block"])
                    layers = sum(1 for name in f.keys() if name.startswith(f"{i}.") and name.endswith(".k"))
                    node = parent.children.get(block)
                    if node is None:
                        node = _Node(block, parent, [f.get_tensor(f"{i}.{j}.k") for j in range(layers)],
                                     [f.get_tensor(f"{i}.{j}.v") for j in range(layers)], used=int(entry["used"]))
                        parent.children[block] = node
                        if len(block) < self.block:
                            parent.short[block] = node
                        self.nbytes += node.nbytes
                    nodes.append(node)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise EdgelmmError(f"{path}: cannot read the prefix cache ({exc})", "give a file that save() wrote") from None
        self._clock = itertools.count(max((n.used for n in self._nodes()), default=0) + 1)  # newer than what was read
        self._evict()
        return len(tree)


@dataclass
class TextOutput:
    """What `forward_from` returns for a text-only rest: the fields prefill readers use."""

    logits: torch.Tensor
    cache: Any


_CACHE_ARGUMENTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def cache_argument(language_model: Any) -> str:
    """The keyword a language model's forward takes its KV cache by (transformers renamed
    `past_key_values` to `cache`); read from its signature once per module."""
    name = _CACHE_ARGUMENTS.get(language_model)
    if name is None:
        name = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
        _CACHE_ARGUMENTS[language_model] = name
    return name


def output_cache(out: Any) -> Any:
    """The KV cache a model's forward returned (transformers names it `cache` or `past_key_values`)."""
    if isinstance(out, TextOutput):
        return out.cache
    return next(out[k] for k in ("cache", "past_key_values") if k in out and out[k] is not None)


def mrope(text_config: Any) -> bool:
    """Whether a model's positions are M-RoPE's (3-D, laid out from the whole prompt's images)."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(text_config, name, None)
        if isinstance(value, dict) and ("mrope_section" in value or value.get("rope_type") == "mrope"):
            return True
    return False


def cached_forward(model: Any, adapter: Any, inputs: dict[str, Any], prefix: PrefixCache | None, images: Sequence[Any],
                   prompt_tokens: int | None = None, logits_to_keep: int = 0) -> tuple[Any, int]:
    """`model(**inputs, use_cache=True, logits_to_keep=...)` through the prefix cache (a batch of
    one): the longest cached head reused, only the rest prefilled, the prompt's new blocks added.
    Returns the output (its cache covers the whole prompt) and the prompt tokens that came from
    the cache. Only the first `prompt_tokens` positions (default: all) are looked up and added:
    tokens appended after a prompt (a verify round's drafts) are read but not cached."""
    if prefix is None or inputs["input_ids"].shape[0] != 1:
        return model(**inputs, use_cache=True, logits_to_keep=logits_to_keep), 0
    keys, hit = lookup(adapter, inputs, prefix, images, prompt_tokens)
    out = forward_from(model, adapter, inputs, hit, logits_to_keep)
    insert(prefix, keys, output_cache(out), inputs["input_ids"].shape[1])
    return out, hit.tokens


def lookup(adapter: Any, inputs: dict[str, Any], prefix: PrefixCache, images: Sequence[Any],
           prompt_tokens: int | None = None) -> tuple[list[Hashable], Hit]:
    """A one-request input's prompt keys (its first `prompt_tokens` positions) and what `prefix` holds of them."""
    ids = inputs["input_ids"]
    mask = adapter.image_token_mask(ids)[0].tolist()
    keys = prompt_keys(ids[0].tolist(), mask, images)[: prompt_tokens or ids.shape[1]]
    hit = prefix.lookup(keys, mask[: len(keys)])
    hit.text_rest = not any(mask[hit.tokens:])
    return keys, hit


def forward_from(model: Any, adapter: Any, inputs: dict[str, Any], hit: Hit, logits_to_keep: int = 0) -> Any:
    """The model's forward over a one-request input on top of `hit` (from `lookup`; nothing cached: the whole
    prompt). Where the cached head holds every image, the rest is text alone and goes straight
    through the adapter's language model and lm_head (as decode steps do), without the family's
    outer forward and its image handling."""
    if hit.tokens == 0:
        return model(**inputs, use_cache=True, logits_to_keep=logits_to_keep)
    ids = inputs["input_ids"]
    length = ids.shape[1]
    if hit.text_rest:  # a hit never ends inside the images
        language_model, cache = adapter.language_model(), hit.cache()
        hidden = language_model(input_ids=ids[:, hit.tokens:], attention_mask=inputs.get("attention_mask"),
                                use_cache=True, **{cache_argument(language_model): cache})[0]
        logits = adapter.lm_head()(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return TextOutput(logits, cache)
    rest = {key: value[:, hit.tokens:] if key != "attention_mask" and isinstance(value, torch.Tensor)
            and value.dim() == 2 and value.shape == (1, length) else value for key, value in inputs.items()}
    return model(**rest, use_cache=True, cache=hit.cache(), logits_to_keep=logits_to_keep)


def insert(prefix: PrefixCache, keys: Sequence[Hashable], cache: Any, length: int) -> None:
    """Add a prefilled prompt's blocks (`cache`, a batch of one, over `length` positions), unless
    a pruning method dropped some of its tokens (then its entries are not one per position)."""
    if cache.get_seq_length() == length:
        prefix.insert(keys, cache)
