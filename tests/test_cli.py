"""The command line: every bad input is one clear line on stderr, a non-zero exit, no traceback."""

import json

import pytest

from edgelmm.cli import main

FIXTURES = "tests/fixtures/configs"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelmm: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_plan_fits_at_4_bits_and_not_at_16(capsys):
    code, out, _ = run(capsys, "plan", f"{FIXTURES}/Qwen2-VL-7B-Instruct", "--hardware", "jetson_orin_nx_16gb", "--weight-bits", "4", "--json")
    assert code == 0 and json.loads(out)["weight_bits"] == 4
    code, out, err = run(capsys, "plan", f"{FIXTURES}/Qwen2-VL-7B-Instruct", "--hardware", "jetson_orin_nx_16gb")
    assert "DOES NOT FIT" in out
    assert_one_line_error(code, err, "does not fit jetson_orin_nx_16gb", "--weight-bits 4")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["plan", "no/such/dir", "--hardware", "cpu"], ["model not found", "no/such/dir"]),
        (["plan", FIXTURES, "--hardware", "cpu"], ["no config.json"]),
        (["plan", f"{FIXTURES}/Qwen3-8B", "--hardware", "nosuch"], ["unknown hardware profile 'nosuch'", "jetson_orin_nx_16gb"]),
        (["bench", "--model", "no/such/dir", "--samples", "1"], ["model not found"]),
        (["bench", "missing.yaml"], ["config file not found"]),
        (["bench"], ["no model given"]),
        (["eval", "--model", "shapes-vlm-s", "--method", "nosuch"], ["unknown method 'nosuch'"]),
        (["eval", "--model", "shapes-vlm-s", "--backend", "nosuch"], ["unknown backend 'nosuch'"]),
    ],
)
def test_bad_input_is_one_line(capsys, argv, fragments):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tardis"}))
    code, _, err = run(capsys, "bench", "--model", str(tmp_path), "--samples", "1", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unsupported model_type 'tardis'")
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_invalid_yaml_and_schema(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [shapes-vlm-s\n")
    code, _, err = run(capsys, "bench", str(bad))
    assert_one_line_error(code, err, "bad.yaml", "invalid YAML")
    bad.write_text("models: [shapes-vlm-s]\ntasks: [shapes-vqa]\nrepeat: 2\n")
    code, _, err = run(capsys, "bench", str(bad))
    assert_one_line_error(code, err, "bad.yaml", "unknown key 'repeat'")


def test_missing_image_names_the_line(tmp_path, capsys):
    data = tmp_path / "val.jsonl"
    data.write_text('{"image": "a.png", "question": "q", "answer": "a"}\n')
    code, _, err = run(capsys, "eval", "--model", "shapes-vlm-s", "--task", "vqa-jsonl", "--task-file", str(data))
    assert_one_line_error(code, err, "val.jsonl:1:", "image not found")


def test_debug_shows_the_traceback(capsys):
    from edgelmm.errors import EdgelmmError

    with pytest.raises(EdgelmmError, match="unknown hardware profile"):
        main(["--debug", "plan", f"{FIXTURES}/Qwen3-8B", "--hardware", "nosuch"])


def test_check_env_and_models(capsys):
    code, out, _ = run(capsys, "check-env")
    assert code == 0 and "torch" in out and "vllm" in out
    code, out, _ = run(capsys, "models")
    assert code == 0 and "shapes-vlm-s" in out and "qwen2_vl" in out


def test_plan_warns_past_the_trained_context(capsys):
    code, out, err = run(capsys, "plan", f"{FIXTURES}/Qwen2.5-7B-Instruct", "--hardware", "h200", "--context", "200000")
    trained = json.loads(open(f"{FIXTURES}/Qwen2.5-7B-Instruct/config.json").read())["max_position_embeddings"]
    assert code == 0 and f"beyond the {trained} tokens" in err and "warning" in out
    code, out, err = run(capsys, "plan", f"{FIXTURES}/Qwen2.5-7B-Instruct", "--hardware", "h200", "--context", "4096")
    assert code == 0 and "warning" not in err + out
    code, out, _ = run(capsys, "plan", f"{FIXTURES}/Qwen2.5-7B-Instruct", "--hardware", "h200", "--context", "200000", "--json")
    assert json.loads(out)["warnings"]


def test_models_says_which_command_takes_which_family(capsys):
    import re

    code, out, _ = run(capsys, "models")
    table = out.split("model_type", 1)[1].splitlines()[2:]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table if line.strip())}
    assert code == 0
    assert rows["llava"] == ["llava", "yes", "yes", "language model"]
    assert rows["qwen2_vl"] == ["qwen2_vl", "yes", "yes", "no (M-RoPE)"]
    assert rows["mixtral"] == ["causal_lm", "yes", "no", "no"]
    assert rows["qwen2"] == ["causal_lm", "yes", "yes", "yes"]


@pytest.mark.parametrize("side", [9000, 14000])  # over our limit; over PIL's own bomb limit too
def test_an_oversized_task_image_is_one_line(tmp_path, capsys, side):
    from PIL import Image

    Image.new("1", (side, side)).save(tmp_path / "big.png")
    data = tmp_path / "val.jsonl"
    data.write_text('{"image": "big.png", "question": "q", "answer": "a"}\n')
    code, _, err = run(capsys, "eval", "--model", "shapes-vlm-s", "--task", "vqa-jsonl", "--task-file", str(data),
                       "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "val.jsonl:1:", "big.png")
    assert "pixels" in err or "decompression bomb" in err


def test_the_demo_refuses_a_folder_of_other_settings_and_appends_when_told(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--samples", "2", "--out", out]) == 0
    capsys.readouterr()
    records = (tmp_path / "demo" / "results.jsonl").read_text().splitlines()
    changed = [json.dumps({**json.loads(r), "settings": "older", "settings_detail": {}}) for r in records]
    (tmp_path / "demo" / "results.jsonl").write_text("\n".join(changed) + "\n")  # as an older edgelmm wrote it
    code, _, err = run(capsys, "demo", "--samples", "2", "--out", out)
    assert_one_line_error(code, err, "measured with other settings", "--append")
    assert main(["demo", "--samples", "2", "--out", out, "--append"]) == 0
