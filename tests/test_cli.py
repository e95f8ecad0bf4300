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
