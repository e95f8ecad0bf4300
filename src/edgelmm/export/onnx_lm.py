"""The language model as one ONNX graph with its KV cache as inputs and outputs.

    inputs   input_ids [batch, sequence] int64        (or inputs_embeds [batch, sequence, hidden])
             attention_mask [batch, total_sequence] int64   (1: attend; total = past + sequence)
             position_ids [batch, sequence] int64     ([3, batch, sequence] for M-RoPE models)
             past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits [batch, sequence, vocab] float32
             present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

The names are those of Optimum's and onnxruntime-genai's decoder exports, so their runtimes'
conventions carry over. Every axis but the model's own sizes is dynamic and named: one graph
serves every prefill length and decoding; the export's manifest lists the prefill lengths a
compiler should build profiles for. Attention is written in plain ops (MatMul, Softmax, Where
on a causal-and-padding mask), grouped-query heads by Expand, rotary embeddings from the model's
own inv_freq and attention scaling, so the graph computes what transformers' modules compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelmm.errors import EdgelmmError
from edgelmm.export.onnx_graph import ACTIVATIONS, Graph

TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass
class LMShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    mrope_section: list[int] | None  # M-RoPE: rotary dims per position axis (temporal, height, width)
    sliding_window: int | None  # attention reaches only this far back (the graph attends to everything)


def rotary_module(adapter: Any) -> Any:
    lm = adapter.language_model()
    rotary = getattr(lm, "rotary_emb", None) or getattr(adapter.model.model, "rotary_emb", None)
    if rotary is None:
        raise EdgelmmError(f"the {adapter.family} model has no rotary embedding module where transformers keeps it")
    return rotary


def mrope_section(text_config: Any) -> list[int] | None:
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    return list(section) if section else None


def lm_shape(adapter: Any) -> LMShape:
    """The language model's sizes, after checking that the graph below computes it faithfully."""
    config = adapter.text_config
    kind = config.model_type
    if kind not in TEXT_TYPES:
        raise EdgelmmError(f"ONNX export does not support '{kind}' language models",
                           f"supported: {', '.join(TEXT_TYPES)} (a Llama-style decoder: RMSNorm, rotary, gated MLP)")
    if getattr(config, "hidden_act", "silu") not in ACTIVATIONS:
        raise EdgelmmError(f"ONNX export: unsupported activation '{config.hidden_act}' in the language model")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    rotary = rotary_module(adapter)
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type == "dynamic":
        raise EdgelmmError("ONNX export: dynamic NTK rope scaling changes with the sequence length and is not written",
                           "export a model with fixed rope parameters")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise EdgelmmError("ONNX export: partial rotary embeddings are not written", "export a model whose rotary covers each head")
    section = mrope_section(config)
    if section is not None and sum(section) * 2 != head_dim:
        raise EdgelmmError(f"ONNX export: mrope_section {section} does not cover head_dim {head_dim}")
    return LMShape(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.hidden_size, config.vocab_size, section, window or None)


def language_graph(adapter: Any, dtype: Any, embeds_in: bool, int4: bool) -> tuple[Any, LMShape]:
    """The ONNX model of the adapter's language model (W4A16 linears as int4 MatMulNBits with `int4`)."""
    shape = lm_shape(adapter)
    g = Graph("language_model", dtype, int4)
    lm = adapter.language_model()
    if embeds_in:
        x = g.input("inputs_embeds", g.dtype, ["batch", "sequence", shape.hidden])
    else:
        ids = g.input("input_ids", np.int64, ["batch", "sequence"])
        x = g.op("Gather", g.weight(lm.embed_tokens.weight, "embed_tokens"), ids)
    mask = g.input("attention_mask", np.int64, ["batch", "total_sequence"])
    positions = g.input("position_ids", np.int64, [3, "batch", "sequence"] if shape.mrope_section else ["batch", "sequence"])
    kv_shape = ["batch", shape.kv_heads, "past_sequence", shape.head_dim]
    past = [(g.input(f"past_key_values.{i}.key", g.dtype, kv_shape), g.input(f"past_key_values.{i}.value", g.dtype, kv_shape))
            for i in range(shape.layers)]

    allowed = _attention_mask(g, x, mask)
    cos, sin = _rotary(g, rotary_module(adapter), positions, shape)
    present_shape = ["batch", shape.kv_heads, "total_sequence", shape.head_dim]
    act = adapter.text_config.hidden_act
    for i, layer in enumerate(adapter.language_layers()):
        attn, mlp = layer.self_attn, layer.mlp
        h = g.rms_norm(x, layer.input_layernorm, f"layers.{i}.input_layernorm")
        q = g.heads(g.linear(h, attn.q_proj, f"layers.{i}.q_proj"), shape.heads, shape.head_dim)
        k = g.heads(g.linear(h, attn.k_proj, f"layers.{i}.k_proj"), shape.kv_heads, shape.head_dim)
        v = g.heads(g.linear(h, attn.v_proj, f"layers.{i}.v_proj"), shape.kv_heads, shape.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head before rotary
            q = g.rms_norm(q, attn.q_norm, f"layers.{i}.q_norm")
            k = g.rms_norm(k, attn.k_norm, f"layers.{i}.k_norm")
        q, k = g.rotary(q, cos, sin, shape.head_dim), g.rotary(k, cos, sin, shape.head_dim)
        k = g.op("Concat", past[i][0], k, axis=2)
        v = g.op("Concat", past[i][1], v, axis=2)
        g.output(f"present.{i}.key", k, g.dtype, present_shape)
        g.output(f"present.{i}.value", v, g.dtype, present_shape)
        groups = shape.heads // shape.kv_heads
        k, v = _repeat(g, k, groups, shape), _repeat(g, v, groups, shape)
        out = g.attention(q, k, v, float(attn.scaling), shape.heads * shape.head_dim, allowed)
        x = g.op("Add", x, g.linear(out, attn.o_proj, f"layers.{i}.o_proj"))
        h = g.rms_norm(x, layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
        gate = g.activation(g.linear(h, mlp.gate_proj, f"layers.{i}.gate_proj"), act)
        x = g.op("Add", x, g.linear(g.op("Mul", gate, g.linear(h, mlp.up_proj, f"layers.{i}.up_proj")), mlp.down_proj,
                                    f"layers.{i}.down_proj"))
    logits = g.linear(g.rms_norm(x, lm.norm, "norm"), adapter.lm_head(), "lm_head")
    if g.dtype != np.float32:
        logits = g.cast(logits, np.float32)
    g.output("logits", logits, np.float32, ["batch", "sequence", shape.vocab])
    g.outputs.insert(0, g.outputs.pop())  # logits first, then present.* in layer order (Optimum's order)
    return g.model(), shape


def embedding_graph(adapter: Any, dtype: Any) -> Any:
    """input_ids -> inputs_embeds: the language model's embedding table alone (a VLM's runtime
    puts image features at the image tokens' rows before the language model reads them)."""
    shape = lm_shape(adapter)
    g = Graph("embedding", dtype)
    ids = g.input("input_ids", np.int64, ["batch", "sequence"])
    g.output("inputs_embeds", g.op("Gather", g.weight(adapter.embed_tokens().weight, "embed_tokens"), ids), g.dtype,
             ["batch", "sequence", shape.hidden])
    return g.model()


def _attention_mask(g: Graph, x: str, mask: str) -> str:
    """[batch, 1, sequence, total] bool: causal over the cache positions, and not padding."""
    length = g.op("Gather", g.op("Shape", x), g.const(1))  # scalars
    total = g.op("Gather", g.op("Shape", mask), g.const(1))
    rows = g.op("Range", g.op("Sub", total, length), total, g.const(1))  # each query's cache position
    cols = g.op("Range", g.const(0), total, g.const(1))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", cols, g.const([0])), g.op("Unsqueeze", rows, g.const([1])))
    padding = g.op("Unsqueeze", g.op("Cast", mask, to=g.onnx.TensorProto.BOOL), g.const([1, 2]))
    return g.op("And", g.op("Unsqueeze", causal, g.const([0, 1])), padding)


def _rotary(g: Graph, rotary: Any, positions: str, shape: LMShape) -> tuple[str, str]:
    """cos, sin [batch, 1, sequence, head_dim] in the graph's type, from float32 angles."""
    angles = g.op("Mul", g.op("Unsqueeze", g.cast(positions, np.float32), g.const([-1])),
                  g.const(rotary.inv_freq.detach().float().cpu().numpy(), np.float32))
    emb = g.op("Concat", angles, angles, axis=-1)
    if shape.mrope_section:  # each run of rotary dims reads its own position axis (temporal, height, width)
        parts, start = [], 0
        for i, size in enumerate(shape.mrope_section * 2):
            parts.append(g.op("Slice", emb, g.const([i % 3, start]), g.const([i % 3 + 1, start + size]), g.const([0, 3])))
            start += size
        emb = g.op("Squeeze", g.op("Concat", *parts, axis=3), g.const([0]))
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    out = []
    for fn in ("Cos", "Sin"):
        value = g.op(fn, emb)
        if scaling != 1.0:
            value = g.op("Mul", value, g.const(scaling, np.float32))
        if g.dtype != np.float32:
            value = g.cast(value, g.dtype)
        out.append(g.op("Unsqueeze", value, g.const([1])))
    return out[0], out[1]


def _repeat(g: Graph, kv: str, groups: int, shape: LMShape) -> str:
    """Grouped-query attention: each KV head serves `groups` query heads."""
    if groups == 1:
        return kv
    dims = g.op("Shape", kv)
    target = g.op("Concat", g.op("Slice", dims, g.const([0]), g.const([2])), g.const([groups]),
                  g.op("Slice", dims, g.const([2]), g.const([4])), axis=0)
    expanded = g.op("Expand", g.op("Unsqueeze", kv, g.const([2])), target)
    return g.op("Reshape", expanded, g.const([0, shape.heads, -1, shape.head_dim]))
