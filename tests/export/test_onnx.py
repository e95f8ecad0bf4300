"""ONNX export and the onnx backend against the torch backend on tiny random models of each
exported family: the same greedy tokens, logits within float32 tolerance, int4 kept as
MatMulNBits, the manifest, and one clear error for each kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from PIL import Image  # noqa: E402

from edgelmm import ModelSpec, load  # noqa: E402
from edgelmm.backends.onnx_backend import MANIFEST_KEY, mrope_positions  # noqa: E402
from edgelmm.config import SamplingParams  # noqa: E402
from edgelmm.errors import EdgelmmError  # noqa: E402
from edgelmm.export.onnx import export_onnx, parse_lens, parse_size  # noqa: E402
from edgelmm.request import Request  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
QWEN_SIZE = (112, 84)  # Qwen2-VL's export size: 4 x 3 merged patches, not square


def _image(seed: int, size: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _requests(multimodal: bool) -> list[Request]:
    texts = ["the red circle", "a big blue square is left of", "what", "shapes and colors and more shapes"]
    if not multimodal:
        return [Request.chat(t) for t in texts]
    return [Request.chat(t, images=[_image(i)]) for i, t in enumerate(texts)] + [Request.chat("no picture here")]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "llava", "qwen2_vl"])
def pair(request, tmp_path_factory):
    """(family, torch backend, onnx backend) over the same tiny checkpoint; the onnx backend reads
    prompts in chunks of the prefill lengths 4 and 16 (a rest of 1-3 tokens padded to 4)."""
    root = tmp_path_factory.mktemp(request.param)
    path = save_tiny(request.param, root / "model")
    size = QWEN_SIZE if request.param == "qwen2_vl" else None
    export_onnx(str(path), root / "onnx", prefill_lens=[4, 16], image_size=size)
    torch_engine = load(ModelSpec(path=str(path), device="cpu"))
    onnx_engine = load(ModelSpec(path=str(root / "onnx"), options={"prefill": "profiles"}), backend="onnx")
    yield request.param, torch_engine, onnx_engine
    torch_engine.close()
    onnx_engine.close()


def test_greedy_tokens_match_torch(pair):
    family, torch_engine, onnx_engine = pair
    requests = _requests(family in ("llava", "qwen2_vl"))
    if family == "qwen2_vl":  # the export's fixed size: give torch the same pixels
        requests = [Request.chat(r.messages[0]["content"][-1]["text"], images=[i.resize(QWEN_SIZE) for i in r.all_images()])
                    for r in requests]
    expected = torch_engine.generate(requests, GREEDY)
    got = onnx_engine.generate(requests, GREEDY)
    for a, b in zip(expected, got):
        assert b.prompt_token_ids == a.prompt_token_ids
        assert b.token_ids == a.token_ids
        assert b.counts.visual_tokens == a.counts.visual_tokens


def test_logprobs_match_torch(pair):
    family, torch_engine, onnx_engine = pair
    params = SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3, prompt_logprobs=2)
    request = Request(text="a small green triangle above the")
    a, b = (e.generate([request], params)[0] for e in (torch_engine, onnx_engine))
    assert b.token_ids == a.token_ids
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
    assert [t for t, _ in b.top_logprobs[0]] == [t for t, _ in a.top_logprobs[0]]
    got = [s.logprob for s in b.prompt_logprobs[1:]]
    np.testing.assert_allclose(got, [s.logprob for s in a.prompt_logprobs[1:]], atol=1e-4)
    if family in ("llava", "qwen2_vl"):  # through the vision graph too
        image = _image(5).resize(QWEN_SIZE) if family == "qwen2_vl" else _image(5)
        params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=True)
        a, b = (e.generate([Request.chat("which shape", images=[image])], params)[0] for e in (torch_engine, onnx_engine))
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)


def test_streams_and_samples(pair):
    _, _, onnx_engine = pair
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    request = Request(text="shapes")
    events = list(onnx_engine.stream(request, params))
    result = events[-1].result
    assert [e.token_id for e in events if e.token_id is not None] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert onnx_engine.generate([request], params)[0].token_ids == result.token_ids  # the seed decides


def test_whole_prompt_and_profiles_agree(pair):
    family, _, onnx_engine = pair
    whole = load(ModelSpec(path=onnx_engine.spec.path), backend="onnx")
    request = _requests(family in ("llava", "qwen2_vl"))[0]
    if family == "qwen2_vl":
        request = Request.chat("the red circle", images=[_image(0).resize(QWEN_SIZE)])
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=True)
    a, b = whole.generate([request], params)[0], onnx_engine.generate([request], params)[0]
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_mrope_positions_match_transformers():
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLModel

    vision = {"spatial_merge_size": 2, "depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2}
    config = Qwen2VLConfig(vision_config=vision, image_token_id=7, video_token_id=8,
                           vision_start_token_id=6, text_config={"num_hidden_layers": 1, "hidden_size": 32,
                                                                  "num_attention_heads": 2, "num_key_value_heads": 1,
                                                                  "intermediate_size": 16, "vocab_size": 20})
    ids = [1, 2, 6] + [7] * 6 + [3, 4, 6] + [7] * 4 + [5]
    grids = np.array([[1, 4, 6], [1, 4, 4]])
    model = Qwen2VLModel(config)
    ids_tensor = torch.tensor([ids])
    expected, _ = model.get_rope_index(ids_tensor, (ids_tensor == 7).int(), image_grid_thw=torch.tensor(grids),
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    np.testing.assert_array_equal(mrope_positions(np.array(ids), grids, 7, 2), expected[:, 0].numpy())


def test_manifest_and_copied_files(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    done = export_onnx(str(path), tmp_path / "out", prefill_lens=[1, 8], max_kv=64)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    manifest = config[MANIFEST_KEY]
    assert config["model_type"] == "llava" and manifest == done.manifest
    assert manifest["prefill_lens"] == [1, 8] and manifest["max_kv"] == 64
    assert manifest["language_model"]["input"] == "inputs_embeds"
    assert "past_key_values.0.key" in manifest["language_model"]["inputs"]
    assert "present.0.value" in manifest["language_model"]["outputs"]
    assert manifest["vision"]["tokens_per_image"] > 0 and manifest["embedding"] == {"file": "embedding.onnx"}
    for name in ("model.onnx", "vision.onnx", "embedding.onnx", "tokenizer.json", *manifest["files"]):
        assert (tmp_path / "out" / name).is_file()
    engine = load(str(tmp_path / "out"), backend="onnx")
    with pytest.raises(EdgelmmError, match="context is 64 tokens"):
        engine.generate([Request(text="shapes")], SamplingParams(max_new_tokens=100))


def test_embedding_outside_the_graph(tmp_path):
    path = save_tiny("qwen2", tmp_path / "model")
    export_onnx(str(path), tmp_path / "table", prefill_lens=[1, 4], embedding_as_input=True)
    export_onnx(str(path), tmp_path / "ids", prefill_lens=[1, 4])
    manifest = json.loads((tmp_path / "table" / "config.json").read_text())[MANIFEST_KEY]
    assert manifest["embedding"] == {"table": "embeddings.safetensors"}
    a, b = (load(str(tmp_path / d), backend="onnx").generate([Request(text="blue")], GREEDY)[0] for d in ("ids", "table"))
    assert a.token_ids == b.token_ids


def test_int4_is_matmulnbits_and_matches_the_quantized_torch_model(tmp_path):
    import onnx

    from edgelmm.methods.quantization import RTNConfig, quantize_checkpoint

    path = save_tiny("llama", tmp_path / "model")
    quantize_checkpoint(str(path), tmp_path / "q4", RTNConfig(bits=4, group_size=16), None, "cpu", "float32", False)
    export_onnx(str(tmp_path / "q4"), tmp_path / "out", prefill_lens=[1, 8])
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops
    assert not any(i.name.endswith("q_proj") for i in graph.initializer)  # no widened copy of a quantized weight
    manifest = json.loads((tmp_path / "out" / "config.json").read_text())[MANIFEST_KEY]
    assert manifest["weights"] == "int4" and manifest["quantization"]["group_size"] == 16
    request = [Request(text="the red circle is")]
    expected = load(ModelSpec(path=str(tmp_path / "q4"), device="cpu")).generate(request, GREEDY)[0]
    got = load(str(tmp_path / "out"), backend="onnx").generate(request, GREEDY)[0]
    assert got.token_ids == expected.token_ids


def test_bad_input(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    with pytest.raises(EdgelmmError, match="longer than --max-kv"):
        export_onnx(str(path), tmp_path / "a", prefill_lens=[1, 128], max_kv=64)
    with pytest.raises(EdgelmmError, match="takes 32x32 only"):
        export_onnx(str(path), tmp_path / "b", image_size=(64, 64))
    with pytest.raises(EdgelmmError, match="float checkpoint"):
        export_onnx(str(path), tmp_path / "c", weights="int4")
    with pytest.raises(EdgelmmError, match="does not support internvl"):
        export_onnx(str(save_tiny("internvl", tmp_path / "internvl")), tmp_path / "d")
    with pytest.raises(EdgelmmError, match="does not support 'gemma'"):
        export_onnx(str(save_tiny("gemma", tmp_path / "gemma")), tmp_path / "e")
    assert not any(p.name.startswith((".a", ".b", ".c", ".d", ".e", "a", "b", "c", "d", "e")) for p in tmp_path.iterdir())
    (tmp_path / "exists").mkdir()
    with pytest.raises(EdgelmmError, match="already exists"):
        export_onnx(str(path), tmp_path / "exists")
    with pytest.raises(EdgelmmError, match="not an ONNX export directory"):
        load(str(tmp_path / "exists"), backend="onnx")
    with pytest.raises(EdgelmmError, match="not an edgelmm ONNX export"):
        load(str(path), backend="onnx")
    with pytest.raises(EdgelmmError, match="expected WIDTHxHEIGHT"):
        parse_size("big")
    with pytest.raises(EdgelmmError, match="comma-separated"):
        parse_lens("1,eight")


def test_corrupt_graph_is_one_line(tmp_path):
    path = save_tiny("qwen2", tmp_path / "model")
    export_onnx(str(path), tmp_path / "out", prefill_lens=[1])
    (tmp_path / "out" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(EdgelmmError, match="onnxruntime cannot load"):
        load(str(tmp_path / "out"), backend="onnx")


def test_image_to_a_text_only_export(tmp_path):
    path = save_tiny("llava", tmp_path / "model")
    export_onnx(str(path), tmp_path / "out", prefill_lens=[1, 8], text_only=True)
    engine = load(str(tmp_path / "out"), backend="onnx")
    with pytest.raises(EdgelmmError, match="no vision graph"):
        engine.generate([Request.chat("what", images=[_image(0)])], GREEDY)
    assert engine.generate([Request.chat("what")], GREEDY)[0].token_ids
