"""The vision encoder and projector as one ONNX graph at one fixed image size.

NPU toolchains and TensorRT compile the vision side for one input resolution; at a fixed size
everything that depends on the image's shape (position embeddings, rotary tables, the patch
grid) is a constant of the graph, so the graph is plain matmuls and norms:

    LLaVA (CLIP):  pixel_values [images, 3, H, W]            -> image_features [images, tokens, text_hidden]
    Qwen2-VL:      pixel_values [images * patches, patch_dim] -> image_features [images * tokens, text_hidden]

(each the layout the family's processor produces and its language model consumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelmm.errors import EdgelmmError
from edgelmm.export.onnx_graph import ACTIVATIONS, Graph


@dataclass
class VisionExport:
    model: Any  # the ONNX model
    info: dict[str, Any]  # the manifest's "vision" entry, less the file name


def vision_graph(adapter: Any, dtype: Any, size: tuple[int, int] | None) -> VisionExport:
    if adapter.family == "llava":
        return _clip(adapter, dtype, size)
    if adapter.family == "qwen2_vl" and adapter.config.model_type == "qwen2_vl":
        return _qwen2_vl(adapter, dtype, size)
    raise EdgelmmError(f"ONNX export has no vision graph for {adapter.config.model_type} models",
                       "vision graphs are written for LLaVA (CLIP) and Qwen2-VL")


def _encoder_layer(g: Graph, x: str, norm1: Any, qkv: list[Any], out: Any, norm2: Any, mlp: Any,
                   heads: int, act: str, hint: str, rotary: tuple[str, str] | None = None) -> str:
    """A pre-norm transformer block over [batch, tokens, width]: full attention within each sequence."""
    h = g.layer_norm(x, norm1, hint + ".norm1")
    width = qkv[0].out_features if len(qkv) == 3 else qkv[0].out_features // 3
    head_dim = width // heads
    if len(qkv) == 3:
        q, k, v = (g.linear(h, m, f"{hint}.{n}") for m, n in zip(qkv, "qkv"))
    else:
        q, k, v = g.op("Split", g.linear(h, qkv[0], hint + ".qkv"), g.const([width] * 3), axis=-1, outputs=3)
    q, k, v = (g.heads(t, heads, head_dim) for t in (q, k, v))
    if rotary is not None:
        q, k = g.rotary(q, *rotary, head_dim), g.rotary(k, *rotary, head_dim)
    x = g.op("Add", x, g.linear(g.attention(q, k, v, head_dim**-0.5, width), out, hint + ".out"))
    h = g.layer_norm(x, norm2, hint + ".norm2")
    return g.op("Add", x, g.linear(g.activation(g.linear(h, mlp[0], hint + ".fc1"), act), mlp[1], hint + ".fc2"))


def _projector(g: Graph, x: str, adapter: Any) -> str:
    projector = adapter.projector()
    act = adapter.config.projector_hidden_act
    if act not in ACTIVATIONS:
        raise EdgelmmError(f"ONNX export: unsupported projector activation '{act}'")
    return g.linear(g.activation(g.linear(x, projector.linear_1, "projector.linear_1"), act), projector.linear_2,
                    "projector.linear_2")


def _clip(adapter: Any, dtype: Any, size: tuple[int, int] | None) -> VisionExport:
    config = adapter.config
    v = config.vision_config
    if v.model_type != "clip_vision_model":
        raise EdgelmmError(f"ONNX export: LLaVA with a '{v.model_type}' vision tower is not written", "supported: CLIP")
    if v.hidden_act not in ACTIVATIONS:
        raise EdgelmmError(f"ONNX export: unsupported vision activation '{v.hidden_act}'")
    if size is not None and size != (v.image_size, v.image_size):
        raise EdgelmmError(f"--image-size {size[0]}x{size[1]}: this CLIP encoder takes {v.image_size}x{v.image_size} only "
                           "(its position embeddings are learned for that size)", f"give --image-size {v.image_size}x{v.image_size}")
    tower = adapter.vision_tower()
    model = getattr(tower, "vision_model", tower)
    emb = model.embeddings
    patch, side = v.patch_size, v.image_size
    patches = (side // patch) ** 2
    layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
    depth = len(model.encoder.layers)
    wanted = sorted({layer % (depth + 1) for layer in layers})

    g = Graph("vision", dtype)
    pixels = g.input("pixel_values", g.dtype, ["images", v.num_channels, side, side])
    x = g.op("Conv", pixels, g.weight(emb.patch_embedding.weight, "patch_embedding"), kernel_shape=[patch, patch],
             strides=[patch, patch])
    x = g.op("Transpose", g.op("Reshape", x, g.const([0, v.hidden_size, -1])), perm=[0, 2, 1])  # [images, patches, width]
    batch = g.op("Slice", g.op("Shape", pixels), g.const([0]), g.const([1]))
    cls = g.op("Expand", g.weight(emb.class_embedding.detach().reshape(1, 1, -1), "class_embedding"),
               g.op("Concat", batch, g.const([1, v.hidden_size]), axis=0))
    x = g.op("Add", g.op("Concat", cls, x, axis=1), g.weight(emb.position_embedding.weight[: patches + 1], "position_embedding"))
    x = g.layer_norm(x, model.pre_layrnorm, "pre_layrnorm")
    states = {0: x}
    for i, layer in enumerate(model.encoder.layers[: max(wanted)]):
        attn = layer.self_attn
        x = _encoder_layer(g, x, layer.layer_norm1, [attn.q_proj, attn.k_proj, attn.v_proj], attn.out_proj,
                           layer.layer_norm2, [layer.mlp.fc1, layer.mlp.fc2], v.num_attention_heads, v.hidden_act,
                           f"vision.layers.{i}")
        states[i + 1] = x
    chosen = [states[layer % (depth + 1)] for layer in layers]
    if config.vision_feature_select_strategy == "default":  # drop [CLS]
        chosen = [g.op("Slice", s, g.const([1]), g.const([patches + 1]), g.const([1])) for s in chosen]
    features = chosen[0] if len(chosen) == 1 else g.op("Concat", *chosen, axis=-1)
    tokens = patches + (config.vision_feature_select_strategy != "default")
    text_hidden = adapter.text_config.hidden_size
    g.output("image_features", _projector(g, features, adapter), g.dtype, ["images", tokens, text_hidden])
    return VisionExport(g.model(), {"image_size": [side, side], "pixel_shape": [v.num_channels, side, side],
                                    "tokens_per_image": tokens})


def _qwen2_vl(adapter: Any, dtype: Any, size: tuple[int, int] | None) -> VisionExport:
    import torch

    visual = adapter.vision_tower()
    v = adapter.config.vision_config
    unit = v.patch_size * v.spatial_merge_size
    width, height = size or (unit * 8, unit * 8)
    if width % unit or height % unit:
        raise EdgelmmError(f"--image-size {width}x{height}: Qwen2-VL images must be multiples of {unit} pixels a side",
                           f"e.g. --image-size {unit * (width // unit or 1)}x{unit * (height // unit or 1)}")
    grid = [1, height // v.patch_size, width // v.patch_size]
    patches = grid[1] * grid[2]
    merge = v.spatial_merge_size**2
    from transformers.vision_utils import get_vision_position_ids

    with torch.no_grad():  # the rotary tables of this grid, by the tower's own code: [patches, head_dim]
        positions = get_vision_position_ids(torch.tensor([grid]), v.spatial_merge_size, kwargs={})
        cos_table, sin_table = visual.rotary_pos_emb(torch.zeros(1), positions)
    g = Graph("vision", dtype)
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = g.input("pixel_values", g.dtype, ["patches", dim])
    weight = visual.patch_embed.proj.weight.detach().reshape(v.embed_dim, -1)  # Conv3d with stride = kernel: a matmul
    x = g.op("MatMul", pixels, g.weight(weight.t(), "patch_embed"))
    x = g.op("Reshape", x, g.const([-1, patches, v.embed_dim]))  # one attention sequence per image
    cos = g.op("Unsqueeze", g.weight(cos_table, "rotary_cos"), g.const([0, 1]))
    sin = g.op("Unsqueeze", g.weight(sin_table, "rotary_sin"), g.const([0, 1]))
    if v.hidden_act not in ACTIVATIONS:
        raise EdgelmmError(f"ONNX export: unsupported vision activation '{v.hidden_act}'")
    for i, block in enumerate(visual.blocks):
        x = _encoder_layer(g, x, block.norm1, [block.attn.qkv], block.attn.proj, block.norm2,
                           [block.mlp.fc1, block.mlp.fc2], v.num_heads, v.hidden_act, f"vision.blocks.{i}", (cos, sin))
    merger = visual.merger
    x = g.op("Reshape", g.layer_norm(x, merger.ln_q, "merger.ln_q"), g.const([-1, v.embed_dim * merge]))
    x = g.linear(g.activation(g.linear(x, merger.mlp[0], "merger.fc1"), "gelu"), merger.mlp[2], "merger.fc2")
    g.output("image_features", x, g.dtype, ["tokens", v.hidden_size])
    return VisionExport(g.model(), {"image_size": [width, height], "resize_to": [width, height], "grid": grid,
                                    "pixel_shape": [patches, dim], "tokens_per_image": patches // merge})
