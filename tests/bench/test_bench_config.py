import pytest

from edgelmm.bench import bench_config_from_args
from edgelmm.config import CONFIGS_DIR, BenchConfig, load_yaml
from edgelmm.errors import EdgelmmError


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("models: [shapes-vlm-s]\ntasks:\n  - name: shapes-vqa\n    sampels: 3\n")
    with pytest.raises(EdgelmmError, match=r"matrix\.yaml: unknown key 'tasks\.0\.sampels'"):
        load_yaml(path, BenchConfig)


def test_yaml_wrong_type_names_file_and_key(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("models: [shapes-vlm-s]\ntasks: [shapes-vqa]\nrepeats: many\n")
    with pytest.raises(EdgelmmError, match=r"matrix\.yaml: key 'repeats'.*'many'"):
        load_yaml(path, BenchConfig)


@pytest.mark.parametrize("name", ["demo.yaml", "demo_gpu.yaml"])
def test_shipped_experiment_configs_load(name):
    config = load_yaml(CONFIGS_DIR / "experiments" / name, BenchConfig)
    assert [m.path for m in config.models] == ["shapes-vlm-s", "shapes-vlm-l"]
    assert [t.name for t in config.tasks] == ["shapes-vqa", "shapes-caption"]
    assert config.device == ("cuda" if "gpu" in name else "cpu")


def test_config_from_args_defaults_and_lists():
    config = bench_config_from_args("shapes-vlm-s", samples=4, device="cpu", max_new_tokens=5)
    assert [m.path for m in config.models] == ["shapes-vlm-s"]
    assert config.backends == ["torch"] and [str(m) for m in config.methods] == ["none"]
    assert [(t.name, t.path) for t in config.tasks] == [("shapes-vqa", None)]
    assert config.samples == 4 and config.sampling.max_new_tokens == 5 and config.batch_size == 1


def test_config_from_args_gives_the_file_to_file_tasks_only():
    config = bench_config_from_args(["a", "b"], tasks=["shapes-vqa", "mc-jsonl"], task_file="d.jsonl")
    assert [(t.name, t.path) for t in config.tasks] == [("shapes-vqa", None), ("mc-jsonl", "d.jsonl")]
    with pytest.raises(EdgelmmError, match="no task reads one"):
        bench_config_from_args("a", task_file="d.jsonl")


def test_config_from_args_bad_value_is_one_line():
    with pytest.raises(EdgelmmError, match=r"command line: key 'samples'"):
        bench_config_from_args("a", samples=0)
