"""Images through llama.cpp: `edgelmm export gguf --mmproj` on the bundled demo model, run by the
llamacpp backend (libmtmd in process) against the torch backend on the same questions and
pictures; the benchmark and the server with images; and every bad pairing as one clear error."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load  # noqa: E402
from edgelmm.cli import main  # noqa: E402
from edgelmm.demo.shapes import generate as shapes  # noqa: E402
from edgelmm.errors import RequestError  # noqa: E402
from edgelmm.export.gguf import export_gguf  # noqa: E402
from edgelmm.export.mmproj import export_mmproj  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmproj")
    return {
        "s": export_gguf("shapes-vlm-s", root / "s.gguf").path, "s-mmproj": export_mmproj("shapes-vlm-s", root / "s-mmproj.gguf").path,
        "l-mmproj": export_mmproj("shapes-vlm-l", root / "l-mmproj.gguf", "f16").path, "root": root,
    }


@pytest.fixture(scope="module")
def pair(files):
    torch_backend = load(ModelSpec(path="shapes-vlm-s", device="cpu"))
    llama = load(ModelSpec(path=str(files["s"]), options={"mmproj": str(files["s-mmproj"]), "n_threads": 1}), backend="llamacpp")
    yield torch_backend, llama
    torch_backend.close()
    llama.close()


def test_same_answers_prompt_and_visual_tokens_as_torch(pair):
    torch_backend, llama = pair
    for sample in shapes(24, seed=5):
        request = Request.chat(sample.question, [sample.image])
        [ours], [theirs] = torch_backend.generate([request], GREEDY), llama.generate([request], GREEDY)
        assert theirs.text == ours.text, sample.question
        assert theirs.prompt_token_ids == ours.prompt_token_ids
        assert theirs.counts.visual_tokens == ours.counts.visual_tokens == 144
        assert llama.prompt_token_ids(request) == ours.prompt_token_ids


def test_stream_and_text_prompts_with_images(pair):
    torch_backend, llama = pair
    sample = shapes(1, seed=6, task="caption")[0]
    request = Request.chat(sample.question, [sample.image])
    long = SamplingParams(max_new_tokens=40)
    events = list(llama.stream(request, long))
    result = events[-1].result
    assert "".join(e.text for e in events) == result.text == torch_backend.generate([request], long)[0].text
    assert len(result.timings.decode_s) == len(result.token_ids) - 1 and result.timings.ttft_s > 0
    raw = Request(text=llama.render_chat(request.messages), images=[sample.image])  # the model's own text
    assert llama.generate([raw], GREEDY)[0].text == llama.generate([request], GREEDY)[0].text


def test_benchmark_cells_for_both_engines(files, tmp_path):
    from edgelmm.bench import bench_config_from_args, run_bench

    config = bench_config_from_args("shapes-vlm-s", backends=["torch", "llamacpp"], samples=8, device="cpu")
    options = {"llamacpp": {"gguf": str(files["s"]), "mmproj": str(files["s-mmproj"]), "n_threads": 1}}
    config = config.model_copy(update={"models": [config.models[0].model_copy(update={"options": options})], "warmup": 1})
    torch_row, llama_row = run_bench(config, tmp_path, progress=False)
    assert llama_row["backend"] == "llamacpp" and llama_row["counts"]["visual_tokens"] == 144
    assert llama_row["accuracy"] == torch_row["accuracy"] >= 0.75


def test_served_with_images(pair):
    pytest.importorskip("fastapi")
    import httpx

    from edgelmm.serve import BackgroundServer
    from edgelmm.serve.app import ServerConfig, create_app
    from edgelmm.serve.engine import Engine
    from tests.serve.conftest import data_url

    torch_backend, llama = pair
    sample = shapes(1, seed=7)[0]
    engine = Engine(llama)
    with BackgroundServer(create_app(engine, ServerConfig("s"))) as server:
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "s", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(sample.image)}}, {"type": "text", "text": sample.question}]}]})
    engine.close()
    assert answer.status_code == 200, answer.text
    expected = torch_backend.generate([Request.chat(sample.question, [sample.image])], GREEDY)[0].text
    assert answer.json()["choices"][0]["message"]["content"] == expected


def test_llama_cpp_quantized_types_still_see(files):
    q4 = export_gguf("shapes-vlm-s", files["root"] / "s-q4_k_m.gguf", "q4_k_m").path
    assert q4.stat().st_size < 0.7 * files["s"].stat().st_size
    with load(ModelSpec(path=str(q4), options={"mmproj": str(files["root"] / "s-mmproj.gguf"), "n_threads": 1}),
              backend="llamacpp") as llama:
        samples = shapes(12, seed=8)
        right = sum(llama.generate([Request.chat(s.question, [s.image])], GREEDY)[0].text.strip() == s.answer for s in samples)
    assert right >= 9


def test_bad_pairings_are_one_clear_error(files, pair, tmp_path):
    torch_backend, llama = pair
    with pytest.raises(EdgelmmError, match="projects images to width 256.*128 wide: it was made for another model"):
        load(ModelSpec(path=str(files["s"]), options={"mmproj": str(files["l-mmproj"])}), backend="llamacpp")
    with pytest.raises(EdgelmmError, match="mmproj file not found"):
        load(ModelSpec(path=str(files["s"]), options={"mmproj": str(tmp_path / "none.gguf")}), backend="llamacpp")
    with pytest.raises(EdgelmmError, match="not a LLaVA multimodal projector"):
        load(ModelSpec(path=str(files["s"]), options={"mmproj": str(files["s"])}), backend="llamacpp")
    with load(ModelSpec(path=str(files["s"]), options={"n_threads": 1}), backend="llamacpp") as text_only:
        image = shapes(1, seed=9)[0].image
        with pytest.raises(RequestError, match="no vision part.*mmproj"):
            text_only.generate([Request.chat("What color?", [image])], GREEDY)
    image = shapes(1, seed=9)[0].image
    with pytest.raises(RequestError, match="token-id prompts with images"):
        llama.generate([Request(token_ids=[1, 3, 4], images=[image])], GREEDY)
    with pytest.raises(RequestError, match="no prompt log-probabilities for image prompts"):
        llama.generate([Request.chat("What color?", [image])], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    with pytest.raises(RequestError, match="1 image placeholders.*for 2 images"):
        llama.generate([Request(text=llama.render_chat(Request.chat("q", [image]).messages), images=[image, image])], GREEDY)
    with pytest.raises(EdgelmmError, match="only LLaVA-family projectors"):
        export_mmproj(str(save_tiny("qwen2_vl", tmp_path / "qvl")), tmp_path / "q-mmproj.gguf")
    with pytest.raises(EdgelmmError, match="already exists"):
        export_mmproj("shapes-vlm-s", files["s-mmproj"])
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_export_command_writes_both_or_nothing(tmp_path, capsys):
    assert main(["export", "gguf", "shapes-vlm-s", str(tmp_path / "s.gguf"), "--mmproj", str(tmp_path / "s-mmproj.gguf")]) == 0
    out = capsys.readouterr().out
    assert "vision tower and projector" in out and (tmp_path / "s-mmproj.gguf").stat().st_size > 0
    qvl = save_tiny("qwen2_vl", tmp_path / "qvl")
    assert main(["export", "gguf", str(qvl), str(tmp_path / "q.gguf"), "--mmproj", str(tmp_path / "q-mmproj.gguf")]) == 1
    assert "only LLaVA-family projectors" in capsys.readouterr().err
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "q-mmproj.gguf").exists()
    (tmp_path / "taken.gguf").write_bytes(b"mine")  # the language model's output exists: nothing is written
    assert main(["export", "gguf", "shapes-vlm-s", str(tmp_path / "taken.gguf"), "--mmproj", str(tmp_path / "t-mmproj.gguf")]) == 1
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "t-mmproj.gguf").exists()


def test_prompt_cache_serves_a_chats_next_turn_and_survives_a_restart(files, pair):
    """llama-cpp-python's own RAM cache of prompt states: the second turn restores the first
    turn's state (its image included) and reads only the rest, with the same answers; the states
    are written to disk on close and read back at load."""
    plain = pair[1]
    state_file = files["root"] / "states.safetensors"
    options = {"mmproj": str(files["s-mmproj"]), "n_threads": 1, "prompt_cache_mb": 64, "prompt_cache_file": str(state_file)}
    cached = load(ModelSpec(path=str(files["s"]), options=options), backend="llamacpp")
    sample = shapes(1, seed=7)[0]
    first = [{"role": "user", "content": [{"type": "image", "image": sample.image}, {"type": "text", "text": sample.question}]}]
    turns = []
    for backend in (plain, cached):
        one = backend.generate([Request(messages=first)], GREEDY)[0]
        second = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "How many shapes are there?"}]
        turns.append((one.text, backend.generate([Request(messages=second)], GREEDY)[0].text))
    assert turns[0] == turns[1]
    assert cached.cache_hits == 1 and cached.cache_hit_tokens >= 144  # the whole first prompt, image and all
    cached.close()
    again = load(ModelSpec(path=str(files["s"]), options=options), backend="llamacpp")
    assert again.generate([Request(messages=second)], GREEDY)[0].text == turns[0][1]
    assert again.cache_hits == 1
    again.close()
    state_file.write_bytes(b"junk")
    with pytest.raises(EdgelmmError, match="cannot read the prompt cache"):
        load(ModelSpec(path=str(files["s"]), options=options), backend="llamacpp")
