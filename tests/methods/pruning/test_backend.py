"""Pruning as a method of a model spec: the torch backend's generate (batched) and stream, and a
benchmark matrix with `methods: [...]`."""

import pytest

from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.bench import bench_config_from_args, run_bench
from edgelmm.errors import EdgelmmError
from edgelmm.methods.pruning import pruning_of
from tests.tiny_models import sample_images, save_tiny

GREEDY = SamplingParams(max_new_tokens=5)


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny("qwen2_vl", tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


def test_generate_batched_and_stream_agree_with_pruning(qwen_path):
    small, large = sample_images("qwen2_vl")
    requests = [Request.chat("What color is the circle?", [small]), Request.chat("How many squares?", [large])]
    engine = load(ModelSpec(path=str(qwen_path), device="cpu", methods=["fastv(k=1, keep=0.5)"]))
    try:
        results = engine.generate(requests, GREEDY)
        stats = pruning_of(engine.model).last
        assert stats.visual_tokens == [4, 8] and stats.kept_visual == [2, 4]
        for request, result in zip(requests, results):
            assert result.counts.visual_tokens == len(request.all_images()[0].getdata()) // 28**2
            [alone] = engine.generate([request], GREEDY)
            events = list(engine.stream(request, GREEDY))
            assert result.token_ids == alone.token_ids == events[-1].result.token_ids
            assert "".join(e.text for e in events) == alone.text
    finally:
        engine.close()


def test_a_bad_method_spec_fails_at_load_in_one_line(qwen_path):
    with pytest.raises(EdgelmmError, match="pruning method 'fastv': k=9 is beyond the model's 2 decoder layers"):
        load(ModelSpec(path=str(qwen_path), device="cpu", methods=["fastv(k=9)"]))


def test_benchmark_matrix_runs_every_pruning_method(tmp_path):
    path = save_tiny("llava", tmp_path / "tiny-llava")
    methods = ["none", "fastv(k=1, keep=0.25)", "random(keep=0.25)", "uniform(keep=0.25)", "visionzip(keep=0.25)"]
    config = bench_config_from_args(str(path), methods=methods, samples=2, device="cpu", max_new_tokens=2)
    rows = run_bench(config.model_copy(update={"warmup": 0}), tmp_path / "run", progress=False)
    assert [row["method"] for row in rows] == methods
    assert all(row["ttft_p50_s"] > 0 and row["samples"] == 2 for row in rows)
    assert "visionzip(keep=0.25)" in (tmp_path / "run" / "report.md").read_text()
