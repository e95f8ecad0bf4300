"""GGUF export: the file carries the language model and tokenizer faithfully, and refuses what it
cannot carry. Engine-level equality with torch is in tests/backends/test_llamacpp_backend.py."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edgelmm import EdgelmmError  # noqa: E402
from edgelmm.cli import main  # noqa: E402
from edgelmm.config import ModelSpec  # noqa: E402
from edgelmm.export.gguf import export_gguf  # noqa: E402
from edgelmm.models.loader import load_model  # noqa: E402
from tests.export.demo_like import save_demo_like  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    return save_demo_like(tmp_path_factory.mktemp("demo") / "shapes-vlm-s")


def field(reader, key):
    return reader.fields[key].contents()


def test_demo_model_exports_with_its_byte_level_bpe(demo_like, tmp_path):
    out = export_gguf(str(demo_like), tmp_path / "s.gguf")
    reader = gguf.GGUFReader(out.path)
    _, _, adapter, _ = load_model(ModelSpec(path=str(demo_like), device="cpu"))
    tokenizer, text = adapter.tokenizer, adapter.text_config
    assert field(reader, "general.architecture") == "llama" == out.arch
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == text.vocab_size and tokens[tokenizer.convert_tokens_to_ids("<image>")] == "<image>"
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL and types[len(tokenizer) - 1] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the chat template writes BOS itself
    assert "<|assistant|>" in field(reader, "tokenizer.chat_template")
    assert field(reader, "llama.context_length") == text.max_position_embeddings
    assert field(reader, "llama.block_count") == text.num_hidden_layers
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight"} <= names
    assert not any("vision" in n or "mm" in n for n in names)  # the language model only


def test_weights_are_the_checkpoints(demo_like, tmp_path):
    """Q/K are stored in llama.cpp's interleaved rotary order; undoing that gives HF's weights back."""
    out = export_gguf(str(demo_like), tmp_path / "s.gguf")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out.path).tensors}
    _, _, adapter, _ = load_model(ModelSpec(path=str(demo_like), device="cpu"))
    layer = adapter.language_layers()[1]
    heads = adapter.text_config.num_attention_heads
    q = tensors["blk.1.attn_q.weight"]
    unpermuted = q.reshape(heads, q.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    assert np.array_equal(unpermuted, layer.self_attn.q_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], layer.mlp.down_proj.weight.detach().numpy())
    assert np.array_equal(tensors["output.weight"], adapter.lm_head().weight.detach().numpy())


@pytest.mark.parametrize("outtype,dtype", [("f16", np.float16), ("q8_0", np.uint8)])
def test_smaller_output_types(demo_like, tmp_path, outtype, dtype):
    out = export_gguf(str(demo_like), tmp_path / f"s-{outtype}.gguf", outtype)
    tensors = {t.name: t for t in gguf.GGUFReader(out.path).tensors}
    assert tensors["blk.0.ffn_up.weight"].data.dtype == dtype
    assert tensors["blk.0.attn_norm.weight"].data.dtype == np.float32  # norms keep full precision
    assert out.bytes < 0.6 * export_gguf(str(demo_like), tmp_path / "s-f32.gguf").bytes


def test_qwen2_exports_without_permutation(tmp_path):
    path = save_tiny("qwen2", tmp_path / "qwen2")
    out = export_gguf(str(path), tmp_path / "q.gguf")
    reader = gguf.GGUFReader(out.path)
    assert out.arch == "qwen2" and field(reader, "general.architecture") == "qwen2"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    _, _, adapter, _ = load_model(ModelSpec(path=str(path), device="cpu"))
    attention = adapter.attention(0)
    assert np.array_equal(tensors["blk.0.attn_q.weight"], attention.q_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.0.attn_q.bias"], attention.q_proj.bias.detach().numpy())


def test_refuses_what_it_cannot_carry(tmp_path):
    with pytest.raises(EdgelmmError, match="qwen2_vl"):
        export_gguf(str(save_tiny("qwen2_vl", tmp_path / "qvl")), tmp_path / "x.gguf")
    with pytest.raises(EdgelmmError, match="does not end in .gguf"):
        export_gguf("anything", tmp_path / "x.bin")
    with pytest.raises(EdgelmmError, match="unknown GGUF output type"):
        export_gguf("anything", tmp_path / "x.gguf", "q2_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


def test_cli(tmp_path, capsys):
    path = save_tiny("llava", tmp_path / "llava")
    assert main(["export", "gguf", str(path), str(tmp_path / "l.gguf"), "--outtype", "f16"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "l.gguf").stat().st_size > 0
    assert main(["export", "gguf", str(tmp_path / "missing"), str(tmp_path / "m.gguf")]) == 1
    assert "model not found" in capsys.readouterr().err
