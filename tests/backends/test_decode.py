"""The torch backend's decode engine (static KV cache, one step per token) against transformers'
own `generate`, on tiny models of every family, in float32 on the CPU: the same greedy tokens
and log-probabilities, alone and in left-padded batches, with pruning (the cache holds the pruned
sequence), M-RoPE positions, sampling, stop strings, streams; and the documented fallbacks."""

from __future__ import annotations

import pytest
import torch

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load
from edgelmm.backends.decode import BUCKET, cache_length, sample
from tests.tiny_models import FAMILIES, sample_images, save_tiny

GREEDY = SamplingParams(max_new_tokens=10, logprobs=True, top_logprobs=2)
ENGINE_FAMILIES = [f for f in FAMILIES if f not in ("mistral", "gemma")]  # gemma: below; mistral: sliding window


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


def pair(path, **options):
    """(engine, generate) backends on one checkpoint."""
    engine = load(ModelSpec(path=str(path), device="cpu", options={"decode": "engine", **options}))
    reference = load(ModelSpec(path=str(path), device="cpu", options={"decode": "generate"}))
    return engine, reference


def requests(backend, n=2):
    prompts = ["What color is the circle?", "How many squares are there in the picture, please?"][:n]
    if not backend.adapter.multimodal:
        return [Request.chat(p) for p in prompts]
    images = sample_images(backend.adapter.config.model_type)
    return [Request.chat(p, [images[i % 2]]) for i, p in enumerate(prompts)]


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in a.top_logprobs or []] == [[t for t, _ in top] for top in b.top_logprobs or []]


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_greedy_tokens_equal_generate(paths, family):
    engine, reference = pair(paths[family])
    for request in requests(engine):
        [ours], [theirs] = engine.generate([request], GREEDY), reference.generate([request], GREEDY)
        assert ours.decode_path == "static" and theirs.decode_path == "generate"
        assert_same([ours], [theirs])
    batch = requests(engine)  # left-padded: rows of different lengths
    assert_same(engine.generate(batch, GREEDY), reference.generate(batch, GREEDY))


@pytest.mark.parametrize("method", ["fastv(k=1, keep=0.5)", "divprune(k=1, keep=0.5, merge=True)", "uniform(keep=0.25)"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_pruning_composes_and_the_cache_holds_the_pruned_sequence(paths, family, method):
    engine, reference = pair(paths[family])
    for backend in (engine, reference):
        from edgelmm.methods import apply

        backend.model = backend.adapter.model = apply(backend.model, backend.adapter, method)
    batch = requests(engine)
    assert_same(engine.generate(batch, GREEDY), reference.generate(batch, GREEDY))
    [request] = batch[:1]
    inputs = engine.prepare_inputs([request], GREEDY)
    prefilled = engine.decoder.prefill(inputs)
    assert prefilled.keys[0].shape[2] < inputs["input_ids"].shape[1]  # the KV cache really is smaller


def test_gemma_scaled_embeddings(paths):
    engine, reference = pair(paths["gemma"])
    assert_same(engine.generate(requests(engine), GREEDY), reference.generate(requests(engine), GREEDY))


def test_stream_stop_strings_and_the_end_token(paths):
    engine, reference = pair(paths["llava"])
    request = requests(engine, 1)[0]
    whole = reference.generate([request], SamplingParams(max_new_tokens=12))[0]
    if len(whole.text) < 4:
        pytest.skip("the tiny model says too little to cut")
    params = SamplingParams(max_new_tokens=12, stop=[whole.text[2:4]], logprobs=True)
    [ours], [theirs] = engine.generate([request], params), reference.generate([request], params)
    assert_same([ours], [theirs])
    events = list(engine.stream(request, params))
    assert "".join(e.text for e in events) == ours.text and events[-1].result.token_ids == ours.token_ids
    eos = engine.adapter.eos_token_ids()[0]
    bias = torch.zeros(engine.adapter.lm_head().out_features)
    bias[eos] = 1e4
    hook = engine.adapter.lm_head().register_forward_hook(lambda module, args, out: out + bias)
    try:
        [ended] = engine.generate([request], params)
    finally:
        hook.remove()
    assert ended.token_ids == [eos] and ended.finish_reason == "stop"


def test_sampling_is_seeded_and_top_k_1_is_greedy(paths):
    engine, _ = pair(paths["qwen2"])
    request = requests(engine, 1)[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=50, top_p=0.9, seed=3)
    first, second = (engine.generate([request], params)[0].token_ids for _ in range(2))
    assert first == second
    greedy = engine.generate([request], SamplingParams(max_new_tokens=12))[0].token_ids
    assert engine.generate([request], params.model_copy(update={"top_k": 1}))[0].token_ids == greedy


def test_the_sampler():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    one, zero = torch.ones(1), torch.zeros(1, dtype=torch.long)
    tokens, chosen, ids, values = sample(logits, False, one, zero, one, 2)
    assert tokens.tolist() == [1] and ids.tolist() == [[1, 3]]
    assert chosen.tolist() == pytest.approx(torch.log_softmax(logits, -1)[0, 1:2].tolist())
    torch.manual_seed(0)
    draws = torch.stack([sample(logits, True, one, zero, torch.tensor([0.5]), 0)[0] for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1}  # top_p=0.5: the best token alone holds more than half
    draws = torch.stack([sample(logits, True, one, torch.tensor([2]), one, 0)[0] for _ in range(400)])
    counts = torch.bincount(draws.flatten(), minlength=4).tolist()
    assert counts[0] == counts[2] == 0 and counts[1] > counts[3] > 0  # top_k=2: tokens 1 and 3, by their odds


def test_cache_lengths_come_in_buckets():
    assert cache_length(1, 4096) == BUCKET and cache_length(BUCKET + 1, 4096) == 2 * BUCKET
    assert cache_length(5000, 4096) == 4096


def test_cache_buffers_are_shared_per_batch_size(paths):
    """Every cache length's step views one set of KV buffers per batch size, grown when needed;
    only the last MAX_BATCH_SIZES batch sizes keep theirs."""
    engine, reference = pair(paths["qwen2"])
    one, two = requests(engine, 1), requests(engine, 2)
    for tokens in (10, BUCKET + 10, 10):
        params = SamplingParams(max_new_tokens=tokens)
        assert_same(engine.generate(one, params), reference.generate(one, params))
    decoder = engine.decoder
    [(keys, _)] = decoder.buffers.values()
    assert keys[0].shape[2] == 2 * BUCKET and len(decoder.steps) == 2
    assert {s.keys[0].untyped_storage().data_ptr() for s in decoder.steps.values()} == {keys[0].untyped_storage().data_ptr()}
    engine.generate(two, GREEDY)
    engine.generate(two + one, GREEDY)
    assert sorted(decoder.buffers) == [2, 3] and {k[0] for k in decoder.steps} == {2, 3}


def test_fallbacks_are_reported(paths):
    with load(ModelSpec(path=str(paths["mistral"]), device="cpu")) as sliding:
        assert sliding.decoder is None and "sliding" in sliding.decode_fallback
        assert sliding.generate(requests(sliding, 1), GREEDY)[0].decode_path == "generate"
    with pytest.raises(EdgelmmError, match="decode engine cannot serve.*sliding.*decode: generate"):
        load(ModelSpec(path=str(paths["mistral"]), device="cpu", options={"decode": "engine"}))
    with load(ModelSpec(path=str(paths["qwen2"]), device="cpu", options={"max_cache_tokens": 24})) as short:
        [result] = short.generate(requests(short, 1), GREEDY)
        assert result.decode_path == "generate"  # longer than the engine's cache: generate serves it
    with pytest.raises(EdgelmmError, match="unknown decode mode 'fast'"):
        load(ModelSpec(path=str(paths["qwen2"]), device="cpu", options={"decode": "fast"}))
    with pytest.raises(EdgelmmError, match="unknown option.*decoding"):
        load(ModelSpec(path=str(paths["qwen2"]), device="cpu", options={"decoding": "fast"}))


def test_the_compiled_step_equals_generate(paths):
    """torch.compile (inductor) of the step: the same tokens; one compilation for two cache lengths."""
    pytest.importorskip("torch._inductor")
    engine, reference = pair(paths["qwen2_vl"], compile=True)
    short, long = requests(engine, 1)[0], requests(engine, 1)[0]
    for request, tokens in ((short, 10), (long, BUCKET + 20)):  # two cache lengths
        params = SamplingParams(max_new_tokens=tokens, logprobs=True)
        [ours], [theirs] = engine.generate([request], params), reference.generate([request], params)
        assert ours.decode_path == "static+compiled" and engine.decoder.compile_failure is None
        assert_same([ours], [theirs])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@CUDA
@pytest.mark.parametrize("family", ["qwen2", "llava", "qwen2_vl", "qwen3_vl", "internvl"])
def test_cuda_graph_steps_equal_generate(paths, family):
    """On CUDA in float32: the captured (and compiled) step gives generate's tokens, alone and in batches."""
    spec = dict(path=str(paths[family]), device="cuda", dtype="float32")
    engine = load(ModelSpec(**spec, options={"decode": "engine"}))
    reference = load(ModelSpec(**spec, options={"decode": "generate"}))
    batch = requests(engine)
    ours, theirs = engine.generate(batch, GREEDY), reference.generate(batch, GREEDY)
    assert {r.decode_path for r in ours} == {"cuda-graph+compiled"}
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=2e-3)
    [alone] = engine.generate(batch[:1], GREEDY)
    assert alone.token_ids == theirs[0].token_ids


@CUDA
def test_cuda_graphs_survive_the_cache_growing(paths):
    """A longer request regrows the KV buffers and drops the steps captured on the old ones; the
    steps captured after that are graphs too (each with its own memory pool)."""
    engine = load(ModelSpec(path=str(paths["qwen2"]), device="cuda"))
    request = requests(engine, 1)[0]
    for tokens in (10, BUCKET + 10, 3 * BUCKET, 10):
        [result] = engine.generate([request], SamplingParams(max_new_tokens=tokens))
        assert result.decode_path == "cuda-graph+compiled"
    assert not any(step.failure for step in engine.decoder.steps.values())


@CUDA
def test_cuda_bfloat16_stream_stop_and_pruning(paths):
    """bf16 on CUDA: within rounding of generate; a stream stopped early leaves the engine sound;
    pruning's smaller cache through the captured step."""
    engine = load(ModelSpec(path=str(paths["qwen2_vl"]), device="cuda", methods=["fastv(k=1, keep=0.5)"]))
    reference = load(ModelSpec(path=str(paths["qwen2_vl"]), device="cuda", methods=["fastv(k=1, keep=0.5)"],
                          options={"decode": "generate"}))
    request = requests(engine, 1)[0]
    params = SamplingParams(max_new_tokens=24, logprobs=True)
    [ours], [theirs] = engine.generate([request], params), reference.generate([request], params)
    assert ours.decode_path == "cuda-graph+compiled"
    same = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b), len(ours.token_ids))
    assert same >= 4 and ours.logprobs[:same] == pytest.approx(theirs.logprobs[:same], abs=0.1)
    stream = engine.stream(request, params)
    next(stream), next(stream)
    stream.close()  # the consumer leaves after two tokens
    assert engine.generate([request], params)[0].token_ids == ours.token_ids


@CUDA
def test_cuda_w4a16_through_the_engine(paths):
    """A W4A16 model decodes through the captured step with the fused kernels; the kernels are reported."""
    from edgelmm.methods.quantization import kernel_choices

    spec = dict(path=str(paths["qwen2"]), device="cuda", methods=["rtn(bits=4, group_size=32)"])
    engine, reference = load(ModelSpec(**spec)), load(ModelSpec(**spec, options={"decode": "generate"}))
    request = requests(engine, 1)[0]
    params = SamplingParams(max_new_tokens=16, logprobs=True)
    [ours], [theirs] = engine.generate([request], params), reference.generate([request], params)
    assert ours.decode_path == "cuda-graph+compiled"
    same = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b), len(ours.token_ids))
    assert same >= 4
    chosen = kernel_choices()
    assert any(len(key) == 6 for key in chosen) and all(v["kernel"] for v in chosen.values())
