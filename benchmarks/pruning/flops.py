"""Language-model prefill FLOPs from the model's shapes, for pruned and unpruned sequences.

Counted: the decoder layers' matrix products (q, k, v, o projections and the gated MLP, 2 FLOPs
per multiply-add) and causal attention (QK^T and AV over the S(S+1)/2 query-key pairs), plus one
row of the LM head (generation keeps only the last token's logits). Norms, rotary embeddings and
the pruning's own scoring are left out; they are a small fraction of a percent here.
"""

from __future__ import annotations

from typing import Any


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, dict) else getattr(config, name)


def layer_flops(config: Any, tokens: int) -> float:
    """One decoder layer over a `tokens`-long prefill."""
    hidden, inter = _get(config, "hidden_size"), _get(config, "intermediate_size")
    heads, kv_heads = _get(config, "num_attention_heads"), _get(config, "num_key_value_heads")
    head_dim = (config.get("head_dim") if isinstance(config, dict) else getattr(config, "head_dim", None)) or hidden // heads
    projections = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * inter
    attention = 2 * heads * head_dim * tokens * (tokens + 1) / 2  # QK^T and AV, causal pairs
    return 2 * tokens * (projections + mlp) + 2 * attention


def prefill_flops(config: Any, tokens: int, kept: int | None = None, k: int = 0) -> float:
    """Prefill of `tokens` tokens; with `kept`, layers k.. run on `kept` tokens only (k=0: all)."""
    layers = _get(config, "num_hidden_layers")
    kept = tokens if kept is None else kept
    head = 2 * _get(config, "hidden_size") * _get(config, "vocab_size")
    return k * layer_flops(config, tokens) + (layers - k) * layer_flops(config, kept) + head
