"""Ahead-of-time export to ONNX: the language model with its KV cache as graph inputs and outputs,
the vision encoder + projector at one fixed image size, and a manifest, in one directory.

    export_onnx("shapes-vlm-s", "out/shapes-vlm-s.onnx")                    # fp32, parity with torch
    export_onnx("runs/q4", "out/q4.onnx", weights="int4")                    # a W4A16 checkpoint, int4 kept
    export_onnx("./Qwen2-VL-2B-Instruct", "out/qwen2-vl", image_size=(448, 448), dtype="fp16")

The directory (written atomically; an existing one is replaced only with overwrite):

    config.json            the model's transformers config + the "edgelmm_onnx" manifest:
                           files, input/output names, sizes, dtype, weights, prefill lengths, max KV
    model.onnx             the language model (see onnx_lm.py)
    embedding.onnx         VLMs: input_ids -> inputs_embeds (or embeddings.safetensors with
                           embedding_as_input: the table outside every graph, gathered by the runtime)
    vision.onnx            VLMs: pixel values -> image features (see onnx_vision.py)
    tokenizer.json, chat_template.jinja, processor_config.json, generation_config.json, ...

Families: plain decoder LMs (llama, mistral, qwen2, qwen3), LLaVA (CLIP + any of those), Qwen2-VL.
Refused, each with its reason: InternVL (its InternViT tower and pixel-shuffle projector are not
written yet), Qwen2.5-VL's vision side (window attention; its language model exports with
--text-only), Qwen3-VL (its deepstack features are added inside the first decoder layers, which
the language-model graph has no input for), and models the graph would compute wrongly
(sliding windows, partial or dynamic rotary, other norms).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelmm.backends.onnx_backend import FORMAT_VERSION, MANIFEST_KEY
from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.export.onnx_graph import OPSET, onnx_module
from edgelmm.export.onnx_lm import embedding_graph, language_graph, lm_shape
from edgelmm.export.onnx_vision import vision_graph
from edgelmm.utils.io import atomic_directory

DTYPES = {"fp32": np.float32, "fp16": np.float16}
WEIGHTS = ("int4", "16bit")
FAMILIES = ("causal_lm", "llava", "qwen2_vl")
REFUSED = {
    "internvl": "its InternViT tower and pixel-shuffle projector are not written as ONNX graphs yet",
    "qwen3_vl": "its deepstack image features are added inside the first decoder layers, which the exported "
                "language model has no input for",
}
# what a runtime needs besides the graphs: tokenizer, chat template, processor and generation settings
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
              "merges.txt", "chat_template.jinja", "chat_template.json", "processor_config.json",
              "preprocessor_config.json", "generation_config.json", "added_tokens.json")
EXTERNAL_DATA_BYTES = 1 << 30  # graphs above this keep their weights in a .data file beside them (protobuf's 2 GB limit)


@dataclass
class OnnxExport:
    path: Path
    manifest: dict[str, Any]
    bytes: int


def parse_lens(text: str) -> list[int]:
    try:
        lens = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise EdgelmmError(f"--prefill-lens '{text}': expected comma-separated token counts, e.g. 1,8,96") from None
    if not lens or lens[0] < 1:
        raise EdgelmmError(f"--prefill-lens '{text}': every length must be at least 1")
    return lens


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(t) for t in str(text).lower().split("x"))
    except ValueError:
        raise EdgelmmError(f"--image-size '{text}': expected WIDTHxHEIGHT, e.g. 448x448") from None
    if w < 1 or h < 1:
        raise EdgelmmError(f"--image-size '{text}': both sides must be positive")
    return w, h


def _check_family(adapter_cls: Any, model_type: str, text_only: bool) -> None:
    if adapter_cls.family in REFUSED and not text_only:
        raise EdgelmmError(f"ONNX export does not support {model_type} models: {REFUSED[adapter_cls.family]}")
    if adapter_cls.family not in FAMILIES + tuple(REFUSED):
        raise EdgelmmError(f"ONNX export does not support the '{adapter_cls.family}' family ({model_type})",
                           f"supported: {', '.join(FAMILIES)}")


def _load(model: str, checkpoint: Any) -> Any:
    """The model on the CPU in float32 (W4A16 layers stay QuantLinear), wrapped in its adapter."""
    from edgelmm.methods.quantization import load_quantized_model
    from edgelmm.models.loader import load_model

    spec = ModelSpec(path=model, device="cpu", dtype="float32")
    loader = load_quantized_model if checkpoint.quantization is not None else load_model
    _, _, adapter, _ = loader(spec, checkpoint)
    return adapter


def _save(onnx: Any, model: Any, path: Path) -> int:
    """Write and check one graph; its size on disk."""
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EdgelmmError(f"the exported {path.name} does not pass onnx.checker: {first}") from None
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def export_onnx(model: str, out: str | Path, prefill_lens: list[int] | None = None, max_kv: int | None = None,
                embedding_as_input: bool = False, image_size: tuple[int, int] | None = None, dtype: str = "fp32",
                weights: str | None = None, text_only: bool = False, overwrite: bool = False) -> OnnxExport:
    from edgelmm.methods.quantization.checkpoint import scheme_of
    from edgelmm.models.loader import resolve_checkpoint

    onnx = onnx_module()
    out = Path(out)
    if out.exists() and not overwrite:
        raise EdgelmmError(f"{out} already exists", "choose another output directory or pass --overwrite")
    if dtype not in DTYPES:
        raise EdgelmmError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    checkpoint = resolve_checkpoint(model)
    _check_family(checkpoint.adapter_cls, checkpoint.model_type, text_only)
    quantization = checkpoint.quantization
    weights = weights or ("int4" if quantization else "16bit")
    if weights not in WEIGHTS:
        raise EdgelmmError(f"--weights {weights}: choose one of {', '.join(WEIGHTS)}")
    scheme = scheme_of(quantization) if quantization else None
    if weights == "int4":
        if scheme is None:
            raise EdgelmmError(f"--weights int4 exports a W4A16 checkpoint's integers, and {model} is a float checkpoint",
                               f"quantize it first: edgelmm quantize {model} --method awq --out Q, then export Q")
        bits, group, _ = scheme
        if bits != 4:
            raise EdgelmmError(f"--weights int4: {model} holds {bits}-bit weights", "export it with --weights 16bit")
        if group < 16 or group & (group - 1):
            raise EdgelmmError(f"--weights int4: group size {group} is not a power of two of at least 16, "
                               "which MatMulNBits needs", "quantize with --group-size 32, 64 or 128")
    lens = prefill_lens or [1, 8, 96]
    adapter = _load(model, checkpoint)
    trained = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 4096)
    max_kv = int(max_kv or min(trained, 4096))
    if max_kv > trained:
        raise EdgelmmError(f"--max-kv {max_kv} is beyond the model's trained context ({trained} positions)",
                           f"give --max-kv {trained} or less")
    if max(lens) > max_kv:
        raise EdgelmmError(f"--prefill-lens {max(lens)} is longer than --max-kv {max_kv}", "lower the prefill length or raise --max-kv")
    multimodal = adapter.multimodal and not text_only
    np_dtype = DTYPES[dtype]
    shape = lm_shape(adapter)
    if shape.sliding_window and shape.sliding_window < max_kv:
        raise EdgelmmError(f"the model attends over a sliding window of {shape.sliding_window} tokens, which the exported "
                           f"graph does not write; within --max-kv {max_kv} it would answer differently",
                           f"give --max-kv {shape.sliding_window} or less")
    vision = vision_graph(adapter, np_dtype, image_size) if multimodal else None  # bad sizes fail before anything is written
    if not multimodal and image_size is not None:
        raise EdgelmmError("--image-size is for vision-language models; this export has no vision graph")
    embeds_in = multimodal or embedding_as_input
    lm_model, _ = language_graph(adapter, np_dtype, embeds_in, weights == "int4")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "family": adapter.family, "source": str(model), "opset": OPSET,
        "dtype": np.dtype(np_dtype).name, "weights": weights,
        "quantization": None if scheme is None else {"bits": scheme[0], "group_size": scheme[1], "symmetric": scheme[2],
                                                     "method": quantization.get("quant_method") if quantization else None},
        "prefill_lens": lens, "decode_len": 1, "max_kv": max_kv,
        "language_model": {
            "file": "model.onnx", "input": "inputs_embeds" if embeds_in else "input_ids", "mrope": shape.mrope_section is not None,
            "layers": shape.layers, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "hidden_size": shape.hidden, "vocab_size": shape.vocab,
            "inputs": [i.name for i in lm_model.graph.input], "outputs": [o.name for o in lm_model.graph.output],
        },
        "embedding": None, "vision": None, "files": [],
    }
    total = 0
    with atomic_directory(out, overwrite) as tmp:
        total += _save(onnx, lm_model, tmp / "model.onnx")
        del lm_model
        if embedding_as_input:
            from safetensors.numpy import save_file

            table = adapter.embed_tokens().weight.detach().float().numpy().astype(np_dtype)
            save_file({"weight": table}, str(tmp / "embeddings.safetensors"))
            manifest["embedding"] = {"table": "embeddings.safetensors"}
            total += (tmp / "embeddings.safetensors").stat().st_size
        elif multimodal:
            total += _save(onnx, embedding_graph(adapter, np_dtype), tmp / "embedding.onnx")
            manifest["embedding"] = {"file": "embedding.onnx"}
        if vision is not None:
            total += _save(onnx, vision.model, tmp / "vision.onnx")
            manifest["vision"] = {"file": "vision.onnx", **vision.info}
        for name in SIDE_FILES:
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, tmp / name)
                manifest["files"].append(name)
        config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps({**config, MANIFEST_KEY: manifest}, indent=2) + "\n")
    return OnnxExport(out, manifest, total)
