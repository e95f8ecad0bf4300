"""The language model of a Llama- or Qwen2-family checkpoint as a GGUF file for llama.cpp.

    export_gguf("shapes-vlm-s", "shapes-vlm-s.gguf")          # f32: bit-for-bit the same weights
    export_gguf("./Qwen2.5-0.5B-Instruct", "q.gguf", "q8_0")

llama.cpp's own converter is a script of its source tree, not a package; this writer uses the
`gguf` package (the same library that script uses) and reads the weights through the model
adapter, so the language model of a VLM (LLaVA's Llama, InternVL's Qwen2) exports exactly like
a plain causal LM, and the vision tower and projector stay behind. Only byte-level BPE
tokenizers are carried (llama.cpp's "gpt2" tokenizer model): the demo models' tokenizer is one.
What cannot be carried faithfully (another tokenizer, rope scaling, sliding windows) is refused
with one line instead of being written wrongly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelmm.backends.llamacpp_backend import CHAT_PARTS_KEY, EOS_KEY, IMAGE_KEY, IMAGE_TOKENS_KEY
from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError, MissingExtraError
from edgelmm.utils.io import as_new, output_parent

# transformers text model_type -> llama.cpp architecture
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
OUT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
# Types llama.cpp's own quantizer writes (llama_model_quantize, from an f32 file of ours): its block
# layouts, its choice of types per tensor (q4_k_m keeps some tensors at 6 bits), its fallbacks for
# rows its blocks do not divide.
LLAMA_QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# Split-regex pre-tokenizers llama.cpp knows, by the name it reads from tokenizer.ggml.pre.
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _LETTERS + r"\p{N}" + _TAIL: "qwen2",
    _LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",
}

# HF decoder-layer module -> GGUF tensor stem
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class GGUFExport:
    path: Path
    arch: str
    outtype: str
    tensors: int
    vocab_size: int
    bytes: int


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("GGUF export", "llamacpp", "gguf") from None
    return gguf


def _pre_tokenizer(data: dict[str, Any] | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; refuses any it would split differently."""
    if data and data.get("type") == "ByteLevel" and data.get("use_regex", True) and not data.get("add_prefix_space"):
        return "gpt-2"
    if data and data.get("type") == "Sequence":
        parts = data.get("pretokenizers", [])
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
            name = PRE_TOKENIZERS.get(parts[0].get("pattern", {}).get("Regex", ""))
            if name and not parts[1].get("use_regex", True):
                return name
    raise EdgelmmError(
        f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(data)[:120]} is not one llama.cpp splits the same way",
        "only byte-level BPE tokenizers with the GPT-2, Qwen2 or Llama-3 pre-tokenizer are exported",
    )


def _vocab(tokenizer: Any, vocab_size: int, gguf: Any) -> dict[str, Any]:
    """Tokens (byte-level strings, as llama.cpp's gpt2 tokenizer model expects), types and merges."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise EdgelmmError(
            f"GGUF export: the tokenizer is {data['model']['type']} with decoder {data.get('decoder')}, not byte-level BPE",
            "export a model whose tokenizer is byte-level BPE (GPT-2 style)",
        )
    if len(tokenizer) > vocab_size:
        raise EdgelmmError(f"GGUF export: the tokenizer has {len(tokenizer)} tokens but the embedding only {vocab_size} rows")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            if i not in added:
                types.append(gguf.TokenType.NORMAL)
            else:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    probe = tokenizer("a", add_special_tokens=True).input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    return {
        "tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer(data.get("pre_tokenizer")),
        "add_bos": len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id,
        "add_eos": len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id,
    }


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half rotary layout -> the interleaved pairs llama.cpp's "llama" arch rotates."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_name(key: str) -> str:
    """HF language-model state-dict key -> GGUF tensor name; unknown keys are an error, never dropped."""
    if key == "embed_tokens.weight":
        return "token_embd.weight"
    if key == "norm.weight":
        return "output_norm.weight"
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) >= 4:
        stem = _LAYER_NAMES.get(".".join(parts[2:-1]))
        if stem:
            return f"blk.{parts[1]}.{stem}.{parts[-1]}"
    raise EdgelmmError(f"GGUF export: no llama.cpp tensor for '{key}'", "this layer type is not supported by the exporter")


def _encode(array: np.ndarray, outtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype): norms and biases stay f32, matrices take the asked type."""
    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:  # q8_0 blocks are 32 wide; an odd row width keeps full precision
        return array.astype(np.float32), None
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _checkpoint_dtype(config: dict[str, Any]) -> str:
    """Load in the checkpoint's own precision: no rounding before the requested output type."""
    text = config.get("text_config") or {}
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """A .gguf output path in an existing folder, not replacing a file unless `overwrite`."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise EdgelmmError(f"output file '{out}' does not end in .gguf", "name the output FILE.gguf")
    if out.exists() and not overwrite:
        raise EdgelmmError(f"{out} already exists", "choose another output file or pass --overwrite")
    output_parent(out)
    return out


def export_gguf(model: str, out: str | Path, outtype: str = "f32", name: str | None = None,
                overwrite: bool = False) -> GGUFExport:
    """Write the language model of `model` (bundled name or checkpoint dir) to `out` atomically;
    an existing `out` is refused unless `overwrite`, and its folder must exist."""
    gguf = _gguf()
    from edgelmm.models.loader import load_model, resolve_checkpoint

    if outtype not in OUT_TYPES:
        raise EdgelmmError(f"unknown GGUF output type '{outtype}'", f"choose one of: {', '.join(OUT_TYPES)}")
    out = check_output(out, overwrite)
    checkpoint = resolve_checkpoint(model)
    if checkpoint.quantization is not None:
        raise EdgelmmError(f"{model} is a W4A16/W8A16 checkpoint: GGUF export takes the float model",
                           "export the float checkpoint it was quantized from, with --outtype q8_0 for 8-bit weights")
    spec = ModelSpec(path=model, device="cpu", dtype=_checkpoint_dtype(checkpoint.config))
    _, processor, adapter, _ = load_model(spec, checkpoint)
    text = adapter.text_config
    arch = ARCHES.get(text.model_type)
    if arch is None:
        raise EdgelmmError(
            f"GGUF export: the language model of {checkpoint.path} is '{text.model_type}'",
            f"supported language models: {', '.join(ARCHES)}",
        )
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise EdgelmmError(f"GGUF export: rope scaling '{rope['rope_type']}' is not exported", "export a model with plain RoPE")
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) and arch == "llama":
        raise EdgelmmError("GGUF export: sliding-window attention is not exported", "export a model with full attention")

    heads, kv_heads, hidden = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads, text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    vocab = _vocab(adapter.tokenizer, text.vocab_size, gguf)
    chat_template = getattr(processor, "chat_template", None) or getattr(adapter.tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")

    tensors: list[tuple[str, np.ndarray]] = []
    for key, value in adapter.language_model().state_dict().items():
        array = value.detach().float().numpy()
        if arch == "llama" and ".self_attn.q_proj." in key:
            array = _permute(array, heads)
        elif arch == "llama" and ".self_attn.k_proj." in key:
            array = _permute(array, kv_heads)
        tensors.append((_tensor_name(key), array))
    if not getattr(text, "tie_word_embeddings", False) and not getattr(adapter.config, "tie_word_embeddings", False):
        tensors.append(("output.weight", adapter.lm_head().weight.detach().float().numpy()))

    written = "f32" if outtype in LLAMA_QUANTIZED else outtype
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or Path(model.rstrip("/")).name)
        writer.add_context_length(text.max_position_embeddings)
        writer.add_embedding_length(hidden)
        writer.add_block_count(text.num_hidden_layers)
        writer.add_feed_forward_length(text.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_layer_norm_rms_eps(text.rms_norm_eps)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))))
        writer.add_rope_dimension_count(head_dim)
        if head_dim * heads != hidden:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(text.vocab_size)
        writer.add_file_type(file_types[written])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        tokenizer = adapter.tokenizer
        for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                              ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
            if token_id is not None:
                getattr(writer, f"add_{key}_token_id")(token_id)
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_add_eos_token(vocab["add_eos"])
        if chat_template:
            writer.add_chat_template(chat_template)
        # A VLM's template reads a list of content parts, a causal LM's a string: tells llama.cpp users which.
        writer.add_bool(CHAT_PARTS_KEY, adapter.multimodal)
        # The tokens transformers stops at, exactly; llama.cpp would guess more from token texts.
        writer.add_array(EOS_KEY, adapter.eos_token_ids())
        image_token = getattr(processor, "image_token", None)
        if adapter.multimodal and image_token:  # where the llamacpp backend puts images (with --mmproj)
            writer.add_string(IMAGE_KEY, image_token)
            if isinstance(adapter.config.to_dict().get("image_seq_length"), int):
                writer.add_uint32(IMAGE_TOKENS_KEY, adapter.config.image_seq_length)
        for tensor_name, array in tensors:
            data, raw_dtype = _encode(array, written, gguf)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if outtype in LLAMA_QUANTIZED:
            _llama_quantize(Path(tmp), outtype)
        as_new(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GGUFExport(out, arch, outtype, len(tensors), text.vocab_size, out.stat().st_size)


def _llama_quantize(path: Path, outtype: str) -> None:
    """Rewrite the f32 GGUF at `path` in one of llama.cpp's own quantized types, in place."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError(f"GGUF export to {outtype} (llama.cpp's quantizer)", "llamacpp", "llama_cpp") from None
    quantized = path.with_name(path.name + ".q")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[outtype])
    try:
        status = llama_cpp.llama_model_quantize(str(path).encode(), str(quantized).encode(), params)
        if status != 0:
            raise EdgelmmError(f"llama.cpp's quantizer failed on {outtype} (status {status})")
        os.replace(quantized, path)
    finally:
        quantized.unlink(missing_ok=True)
