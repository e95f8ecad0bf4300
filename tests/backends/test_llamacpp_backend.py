"""llama.cpp on GGUFs exported from the demo model's architecture (and tiny Llama/Qwen2 models):
the same prompt tokens and the same greedy tokens as the torch backend, log-probabilities to
float tolerance, scoring, sampling, serving, and clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load  # noqa: E402
from edgelmm.demo.shapes import generate as shapes  # noqa: E402
from edgelmm.export.gguf import export_gguf  # noqa: E402
from tests.export.demo_like import save_demo_like, trained_demo  # noqa: E402
from tests.tiny_models import make_image, save_tiny  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=12, logprobs=True)
TIE = 1e-3  # two logits this close may order differently in two float32 engines


def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llamacpp")
    found = {
        "demo-like": str(save_demo_like(root / "demo-like")),
        "llama": str(save_tiny("llama", root / "llama")),
        "qwen2": str(save_tiny("qwen2", root / "qwen2")),
    }
    if trained_demo():
        found["shapes-vlm-s"] = "shapes-vlm-s"
    return found


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (torch backend, llamacpp backend) on the same checkpoint."""
    out = {}
    for name, path in models(tmp_path_factory).items():
        gguf_path = export_gguf(path, tmp_path_factory.mktemp("gguf") / f"{name}.gguf").path
        out[name] = (load(ModelSpec(path=path, device="cpu")),
                     # one thread: llama.cpp's spinning thread pool crawls when other work shares the cores
                     load(ModelSpec(path=str(gguf_path), options={"logits_all": True, "n_threads": 1}), backend="llamacpp"))
    yield out
    for torch_backend, llama in out.values():
        torch_backend.close()
        llama.close()


def questions(n: int = 4) -> list[Request]:
    return [Request.chat(s.question) for s in shapes(n, seed=11)]


def teacher_forced(torch_backend, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(torch_backend.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_same_prompt_tokens(pairs):
    for torch_backend, llama in pairs.values():
        for request in questions():
            expected = torch_backend.adapter.build_inputs(request)["input_ids"][0].tolist()
            assert llama.prompt_token_ids(request) == expected
            text = torch_backend.adapter.chat_text(request.messages)
            assert llama.prompt_token_ids(Request(text=text)) == torch_backend.prompt_token_ids(Request(text=text))


def test_same_greedy_tokens_or_an_explained_tie(pairs):
    """Equal tokens; where they part, torch's own log-probabilities show a tie at that step."""
    for name, (torch_backend, llama) in pairs.items():
        for request in questions():
            [ours] = torch_backend.generate([request], GREEDY)
            [theirs] = llama.generate([request], GREEDY)
            if theirs.token_ids != ours.token_ids:
                # the first step where they part; a sequence that ended there chose end-of-sequence
                eos = torch_backend.adapter.eos_token_ids()[0]
                a, b = ours.token_ids + [eos], theirs.token_ids + [eos]
                step = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                prompt = llama.prompt_token_ids(request)
                logprobs = teacher_forced(torch_backend, prompt + a[:step])[-1]
                gap = float(logprobs[a[step]] - logprobs[b[step]])
                assert gap < TIE, f"{name}: llama.cpp chose another token at step {step} without a tie ({gap:.4f})"
                continue
            assert theirs.text == ours.text and theirs.finish_reason == ours.finish_reason
            assert theirs.logprobs == pytest.approx(ours.logprobs, abs=2e-3)
            assert theirs.counts.prompt_tokens == ours.counts.prompt_tokens


def test_trained_demo_model_answers_alike(pairs):
    if "shapes-vlm-s" not in pairs:
        pytest.skip("the trained demo checkpoint is not in this tree")
    torch_backend, llama = pairs["shapes-vlm-s"]
    requests = questions(8)
    assert [r.text for r in llama.generate(requests, GREEDY)] == [r.text for r in torch_backend.generate(requests, GREEDY)]


def test_stream_equals_generate_and_timings(pairs):
    _, llama = pairs["demo-like"]
    request = questions(1)[0]
    events = list(llama.stream(request, GREEDY))
    [result] = llama.generate([request], GREEDY)
    assert events[-1].result.token_ids == result.token_ids
    assert "".join(e.text for e in events) == result.text
    t = result.timings
    assert 0 < t.ttft_s <= t.e2e_s and len(t.decode_s) == len(result.token_ids) - 1 and all(d > 0 for d in t.decode_s)
    assert result.peak_memory_bytes > 10 * 2**20
    assert llama.device_name().startswith("cpu (llama.cpp")


def test_prompt_logprobs_equal_a_teacher_forced_forward(pairs):
    torch_backend, llama = pairs["demo-like"]
    ids = llama.prompt_token_ids(questions(1)[0]) + [5, 9]
    [result] = llama.generate([Request(token_ids=ids)], SamplingParams(max_new_tokens=0, prompt_logprobs=3))
    scores = result.prompt_logprobs
    expected = teacher_forced(torch_backend, ids)
    assert scores[0].logprob is None and [s.token_id for s in scores] == ids == result.prompt_token_ids
    want = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
    assert [s.logprob for s in scores[1:]] == pytest.approx(want, abs=2e-3)
    assert [lp for _, lp in scores[-1].top] == pytest.approx(expected[-2].topk(3).values.tolist(), abs=2e-3)
    [scored] = torch_backend.generate([Request(token_ids=ids)], SamplingParams(max_new_tokens=0, prompt_logprobs=3))
    assert [s.logprob for s in scored.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)  # both backends alike


def test_stop_strings_and_end_tokens_as_torch(pairs):
    torch_backend, llama = pairs["demo-like"]
    request = questions(1)[0]
    [whole] = torch_backend.generate([request], GREEDY)
    if len(whole.text) < 3:
        pytest.skip("the model says too little to cut")
    params = GREEDY.model_copy(update={"stop": [whole.text[1:3]]})
    [ours], [theirs] = torch_backend.generate([request], params), llama.generate([request], params)
    events = list(llama.stream(request, params))
    assert theirs.text == ours.text == whole.text[:1] == "".join(e.text for e in events)
    assert (theirs.finish_reason, theirs.stop_reason) == ("stop", whole.text[1:3])


def test_sampling_is_seeded(pairs):
    _, llama = pairs["demo-like"]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    request = questions(1)[0]
    first, second = (llama.generate([request], params)[0].token_ids for _ in range(2))
    assert first == second
    assert llama.generate([request], params.model_copy(update={"seed": 6}))[0].token_ids != first or len(first) < 3


def test_serves_completions(pairs):
    pytest.importorskip("fastapi")
    import httpx

    from edgelmm.serve import BackgroundServer
    from edgelmm.serve.app import ServerConfig, create_app
    from edgelmm.serve.engine import Engine

    torch_backend, llama = pairs["demo-like"]
    engine = Engine(llama)
    with BackgroundServer(create_app(engine, ServerConfig("s"))) as server:
        answer = httpx.post(server.url + "/v1/completions", timeout=30, json={
            "model": "s", "prompt": "<s><|user|>\nWhat color is the circle?</s>\n<|assistant|>\n", "max_tokens": 0,
            "echo": True, "logprobs": 1, "return_token_ids": True}).json()
        ids = answer["choices"][0]["prompt_token_ids"]
        expected = teacher_forced(torch_backend, ids)
        want = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
        assert answer["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=2e-3)
        chat = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": "s", "messages": [{"role": "user", "content": "What color is the circle?"}], "max_tokens": 4}).json()
        assert chat["usage"]["completion_tokens"] >= 1
    engine.close()


def test_clear_errors(pairs, tmp_path):
    _, llama = pairs["demo-like"]
    with pytest.raises(EdgelmmError, match="language model only"):
        llama.generate([Request.chat("What color?", [make_image()])], GREEDY)
    with pytest.raises(EdgelmmError, match="GGUF file not found"):
        load(ModelSpec(path=str(tmp_path / "missing.gguf")), backend="llamacpp")
    with pytest.raises(EdgelmmError, match="needs a GGUF file"):
        load(ModelSpec(path="shapes-vlm-s"), backend="llamacpp")
    with pytest.raises(EdgelmmError, match="unknown option.*n_ctxx"):
        load(ModelSpec(path="x.gguf", options={"n_ctxx": 1}), backend="llamacpp")
    with pytest.raises(EdgelmmError, match="context"):
        llama.generate([Request.chat("circle " * 600)], GREEDY)
    with pytest.raises(EdgelmmError, match="outside the model's vocabulary"):
        llama.generate([Request(token_ids=[1, 10**6])], GREEDY)
    gguf_path = llama.spec.path
    with pytest.raises(EdgelmmError, match="cannot apply edgelmm methods"):
        load(ModelSpec(path=gguf_path, methods=["fastv(k=2, keep=0.5)"]), backend="llamacpp")
    load(ModelSpec(path=gguf_path, methods=["none"]), backend="llamacpp").close()  # what a benchmark matrix passes
