import pytest

from edgelmm.config import BenchConfig, HardwareProfile, SamplingParams, load_yaml
from edgelmm.errors import EdgelmmError
from edgelmm.methods import NoMethod, parse_method
from edgelmm.methods.pruning import FastV
from edgelmm.methods.quantization import AWQConfig, CalibrationConfig
from edgelmm.registry import parse_spec


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bench_config_accepts_names_and_fills_defaults(tmp_path):
    config = load_yaml(write(tmp_path, "models: [shapes-vlm-s]\ntasks: [shapes-vqa]\n"), BenchConfig)
    assert config.models[0].path == "shapes-vlm-s"
    assert config.tasks[0].name == "shapes-vqa"
    assert config.backends == ["torch"] and config.methods == [NoMethod()]


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
        ("awq(bits=4,group_size=128, symmetric=True)", ("awq", {"bits": 4, "group_size": 128, "symmetric": True})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["fastv(2)", "fastv(k=)", "1+2", "fastv(k=open('x'))", ""])
def test_parse_method_rejects(spec):
    with pytest.raises(EdgelmmError, match="cannot parse method"):
        parse_method(spec)


def test_methods_are_typed_objects_with_one_name_per_setting():
    assert parse_method("fastv(k=2, keep=0.25)") == FastV(k=2, keep=0.25)
    awq = parse_method("awq(bits=4, group_size=64, calibration='texts.jsonl')")
    assert awq == AWQConfig(bits=4, group_size=64, calibration=CalibrationConfig(source="texts.jsonl"))
    for method in (FastV(k=2, keep=0.25), awq, parse_method("divprune(k=1, keep=0.25, merge=True)"), NoMethod()):
        assert parse_method(str(method)) == method  # str() is the spec, with the same names
    assert str(FastV(k=2, keep=0.25)) == "fastv(k=2, keep=0.25)"


def test_unknown_method():
    with pytest.raises(EdgelmmError, match="unknown method 'nosuch'.*available: .*none"):
        parse_method("nosuch(k=1)")


def test_bad_methods_fail_when_the_yaml_loads(tmp_path):
    """A typo in a method fails with the file and the key, before anything loads."""
    for methods, message in [
        ("[none, 'fastv(k=2, keep=0)']", r"c\.yaml.*key 'methods\.1'.*keep must be a share"),
        ("['rtn(w_bit=4)']", r"key 'methods\.0'.*unknown setting.*w_bit.*did you mean 'bits'"),
        ("['fastvv(keep=0.5)']", r"key 'methods\.0'.*unknown method 'fastvv'"),
        ("['rtn(group_size=100)']", r"unsupported group size: 100"),
    ]:
        path = write(tmp_path, f"models: [m]\ntasks: [t]\nmethods: {methods}\n")
        with pytest.raises(EdgelmmError, match=message):
            load_yaml(path, BenchConfig)


def test_a_method_is_written_back_as_its_spec():
    config = BenchConfig(models=["m"], tasks=["t"], methods=["fastv(keep=0.25, k=2)", "none"])
    assert config.model_dump()["methods"] == ["fastv(k=2, keep=0.25)", "none"]


def test_sampling_params_refuse_what_no_backend_can_run():
    for bad in ({"seed": 2**64}, {"stop": [""]}, {"max_new_tokens": 0}, {"top_logprobs": 21}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(top_logprobs=2).wants_logprobs
