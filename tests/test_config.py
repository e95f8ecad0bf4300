import pytest

from edgelmm.config import BenchConfig, HardwareProfile, SamplingParams, load_yaml
from edgelmm.errors import EdgelmmError
from edgelmm.methods import check_method, parse_method


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bench_config_accepts_names_and_fills_defaults(tmp_path):
    config = load_yaml(write(tmp_path, "models: [shapes-vlm-s]\ntasks: [shapes-vqa]\n"), BenchConfig)
    assert config.models[0].path == "shapes-vlm-s"
    assert config.tasks[0].name == "shapes-vqa"
    assert config.backends == ["torch"] and config.methods == ["none"]


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "models: [m]\ntasks: [t]\nwarmpu: 3\n")
    with pytest.raises(EdgelmmError, match=r"c\.yaml.*unknown key 'warmpu'"):
        load_yaml(path, BenchConfig)


def test_nested_unknown_key_is_located(tmp_path):
    path = write(tmp_path, "models: [m]\ntasks: [t]\nsampling: {max_tokens: 3}\n")
    with pytest.raises(EdgelmmError, match=r"unknown key 'sampling\.max_tokens'"):
        load_yaml(path, BenchConfig)


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, "models: [m]\ntasks: [t]\nwarmup: many\n")
    with pytest.raises(EdgelmmError, match=r"key 'warmup'.*integer.*'many'"):
        load_yaml(path, BenchConfig)


def test_invalid_yaml_gives_line(tmp_path):
    path = write(tmp_path, "models: [m\ntasks: t\n")
    with pytest.raises(EdgelmmError, match=r"invalid YAML at line \d+"):
        load_yaml(path, BenchConfig)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(EdgelmmError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml", BenchConfig)
    with pytest.raises(EdgelmmError, match="expected a mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n"), HardwareProfile)


def test_empty_matrix_axis_is_rejected(tmp_path):
    with pytest.raises(EdgelmmError, match="'methods' must list at least one entry"):
        load_yaml(write(tmp_path, "models: [m]\ntasks: [t]\nmethods: []\n"), BenchConfig)


def test_sampling_bounds():
    assert SamplingParams().greedy
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("none", ("none", {})),
        ("fastv(k=2, keep=0.25)", ("fastv", {"k": 2, "keep": 0.25})),
        ("awq(w_bit=4,group=128, zero=True)", ("awq", {"w_bit": 4, "group": 128, "zero": True})),
    ],
)
def test_parse_method(spec, expected):
    assert parse_method(spec) == expected


@pytest.mark.parametrize("spec", ["fastv(2)", "fastv(k=)", "1+2", "fastv(k=open('x'))", ""])
def test_parse_method_rejects(spec):
    with pytest.raises(EdgelmmError, match="cannot parse method"):
        parse_method(spec)


def test_unknown_method():
    with pytest.raises(EdgelmmError, match="unknown method 'nosuch'.*available: .*none"):
        check_method("nosuch(k=1)")
