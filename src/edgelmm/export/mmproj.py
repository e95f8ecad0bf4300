"""A LLaVA checkpoint's vision tower and projector as the multimodal-projector GGUF llama.cpp reads.

    export_mmproj("shapes-vlm-s", "shapes-vlm-s-mmproj.gguf")   # beside export_gguf's language model

llama.cpp's multimodal library (libmtmd, which llama-cpp-python ships) loads LLaVA-1.5-style
projectors written by its `convert_image_encoder_to_gguf.py`: architecture "clip", projector type
"mlp", a CLIP vision tower under `v.*` and the two projector linears as `mm.0` / `mm.2`. This
writer produces that file from the checkpoint itself, with the keys that script writes (image
size, patch size, widths, heads, layer-norm epsilon, the feature layer, the processor's image
mean and std, and `clip.use_gelu` false for CLIP's quick-GELU). As llama.cpp does for LLaVA, the
tower's post-layernorm is left out (LLaVA reads the hidden state before it) and the layers past
the feature layer are dropped.

The class token is left out too, with its row of the position table. llama.cpp's LLaVA graph
(tools/mtmd/models/llava.cpp) appends the class embedding after the patches
(`ggml_concat(inp, class_embedding, 1)`); with it in the file, the projected patch features of
`shapes-vlm-s` differed from transformers' by up to 68 (features of magnitude up to 67) and 78
of 100 greedy answers were the same. Without it the patches attend to each other only, where
transformers also attends to the class token: the features differ by at most 0.31 and 200 of
200 answers were the same (`benchmarks/engines/`).

Only what the file can say faithfully is exported: a CLIP tower, the "default" feature strategy
(the class token dropped, as llama.cpp's MLP projector does), a GELU two-layer projector, one
feature layer. Other LLaVA variants, and other families (Qwen2-VL's and Qwen3-VL's windowed /
merged towers with M-RoPE, InternVL's pixel shuffle), have projector types of their own in
llama.cpp's newer converter (`convert_hf_to_gguf.py --mmproj`); they are refused with one line.
The patch convolution is stored in f16, as llama.cpp's converter stores it; everything else in
the asked type (f32 or f16).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.export.gguf import GGUFExport, _checkpoint_dtype, _gguf, check_output
from edgelmm.utils.io import as_new

MMPROJ_TYPES = ("f32", "f16")
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",  # llama.cpp's LLaVA names (fc1 is up in size: it reads them by shape)
}


def _feature_layer(config: dict[str, Any], layers: int) -> int:
    """The encoder output LLaVA reads, as an index into [embeddings, block 0, ..., block n-1]."""
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise EdgelmmError(f"mmproj export: several vision feature layers ({layer}) are not in llama.cpp's LLaVA projector",
                           "export a model that reads one feature layer")
    index = layer if layer >= 0 else layers + layer + 1
    if not 1 <= index <= layers:
        raise EdgelmmError(f"mmproj export: vision_feature_layer {layer} is outside the tower's {layers} layers")
    return index


def _tower_tensor(key: str, block_count: int) -> str | None:
    """CLIP vision state-dict key -> mmproj tensor name; None for what llama.cpp's LLaVA leaves out."""
    fixed = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.position_embedding.weight": "v.position_embd.weight", "pre_layrnorm.weight": "v.pre_ln.weight",
             "pre_layrnorm.bias": "v.pre_ln.bias"}
    key = key.removeprefix("vision_model.")
    if key in fixed:
        return fixed[key]
    if key.startswith("post_layernorm.") or key.endswith("position_ids") or key == "embeddings.class_embedding":
        return None
    parts = key.split(".")
    if parts[:2] == ["encoder", "layers"] and len(parts) >= 5:
        if int(parts[2]) >= block_count:
            return None
        stem = _BLOCK_NAMES.get(".".join(parts[3:-1]))
        if stem:
            return f"v.blk.{parts[2]}.{stem}.{parts[-1]}"
    raise EdgelmmError(f"mmproj export: no llama.cpp tensor for the vision weight '{key}'")


def export_mmproj(model: str, out: str | Path, outtype: str = "f32", overwrite: bool = False) -> GGUFExport:
    """Write the vision tower and projector of a LLaVA checkpoint to `out` atomically; an existing
    `out` is refused unless `overwrite`, and its folder must exist."""
    gguf = _gguf()
    from edgelmm.models.loader import load_model, resolve_checkpoint

    if outtype not in MMPROJ_TYPES:
        raise EdgelmmError(f"mmproj output type '{outtype}' is not written", f"choose one of: {', '.join(MMPROJ_TYPES)}")
    out = check_output(out, overwrite)
    checkpoint = resolve_checkpoint(model)
    config = checkpoint.config
    if checkpoint.model_type != "llava":
        raise EdgelmmError(
            f"mmproj export: {checkpoint.path} is '{checkpoint.model_type}', and only LLaVA-family projectors are written",
            "Qwen2-VL/Qwen3-VL and InternVL towers need llama.cpp's own converter (convert_hf_to_gguf.py --mmproj)")
    if checkpoint.quantization is not None:
        raise EdgelmmError(f"{model} is a W4A16/W8A16 checkpoint: mmproj export takes the float model")
    vision = config.get("vision_config") or {}
    problems = []
    if vision.get("model_type") != "clip_vision_model":
        problems.append(f"a '{vision.get('model_type')}' tower (only CLIP is written)")
    if config.get("vision_feature_select_strategy", "default") != "default":
        problems.append("the 'full' feature strategy (llama.cpp's MLP projector drops the class token)")
    if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
        problems.append("a projector other than linear-GELU-linear with biases")
    if problems:
        raise EdgelmmError(f"mmproj export: {checkpoint.path} has {'; '.join(problems)}")
    block_count = _feature_layer(config, vision["num_hidden_layers"])

    spec = ModelSpec(path=model, device="cpu", dtype=_checkpoint_dtype(config))
    _, processor, adapter, _ = load_model(spec, checkpoint)
    image_processor = getattr(processor, "image_processor", processor)
    tensors: list[tuple[str, np.ndarray]] = []
    for key, value in adapter.vision_tower().state_dict().items():
        name = _tower_tensor(key, block_count)
        if name == "v.position_embd.weight":
            value = value[1:]  # the class token's row goes with the class token (see the module doc)
        if name is not None:
            tensors.append((name, value.detach().float().numpy()))
    projector = adapter.model.model.multi_modal_projector
    for key, value in projector.state_dict().items():
        index = {"linear_1": "0", "linear_2": "2"}.get(key.split(".")[0])
        if index is None:
            raise EdgelmmError(f"mmproj export: no llama.cpp tensor for the projector weight '{key}'")
        tensors.append((f"mm.{index}.{key.split('.')[-1]}", value.detach().float().numpy()))

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "clip")
        writer.add_bool("clip.has_text_encoder", False)
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_bool("clip.has_llava_projector", True)
        writer.add_file_type(0 if outtype == "f32" else 1)
        writer.add_name(Path(model.rstrip("/")).name)
        writer.add_description("image encoder for LLaVA")
        writer.add_string("clip.projector_type", "mlp")
        writer.add_uint32("clip.vision.image_size", vision["image_size"])
        writer.add_uint32("clip.vision.patch_size", vision["patch_size"])
        writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
        writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
        writer.add_uint32("clip.vision.projection_dim", vision.get("projection_dim", vision["hidden_size"]))
        writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.get("layer_norm_eps", 1e-5))
        writer.add_uint32("clip.vision.block_count", block_count)
        writer.add_array("clip.vision.feature_layer", [block_count])
        writer.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
        writer.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
        writer.add_bool("clip.use_gelu", vision.get("hidden_act") == "gelu")
        for name, array in tensors:
            half = array.ndim == 4 or (outtype == "f16" and array.ndim == 2)  # the patch conv always, matrices in f16
            writer.add_tensor(name, array.astype(np.float16 if half else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        as_new(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GGUFExport(out, "clip", outtype, len(tensors), 0, out.stat().st_size)
