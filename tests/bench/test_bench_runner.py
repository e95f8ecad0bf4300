"""The runner end to end on a real (tiny) model: results, samples, report, failure and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from edgelmm.backends.torch_backend import TorchBackend
from edgelmm.bench import bench_config_from_args, run_bench, run_eval
from edgelmm.errors import EdgelmmError

REQUIRED = {
    "model", "backend", "method", "task", "samples", "device", "hardware", "accuracy",
    "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "decode_tok_s", "roofline_decode_tok_s", "e2e_p50_s",
    "peak_memory_bytes", "counts", "started_at", "finished_at", "versions",
}


def config(model, tasks=("shapes-vqa",), methods=("none",), samples=2, **extra):
    base = bench_config_from_args(
        str(model), methods=list(methods), tasks=list(tasks), samples=samples, device="cpu", max_new_tokens=3
    )
    return base.model_copy(update={"warmup": 1, **extra})


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_bench_writes_results_samples_and_report(tiny_llava, tmp_path):
    out = tmp_path / "run"
    rows = run_bench(config(tiny_llava, repeats=2, batch_size=2), out, progress=False)
    (row,) = rows
    assert REQUIRED <= set(row)
    assert (row["model"], row["backend"], row["method"], row["task"], row["samples"]) == (
        "tiny-llava", "torch", "none", "shapes-vqa", 2)
    assert row["device"].startswith("cpu") and row["ttft_p50_s"] > 0 and row["e2e_p50_s"] >= row["ttft_p50_s"]
    assert row["counts"]["visual_tokens"] > 0 and 1 <= row["counts"]["generated_tokens"] <= 3
    assert set(row["versions"]) == {"edgelmm", "torch", "transformers"}
    assert lines(out / "results.jsonl") == rows
    samples = lines(out / row["samples_file"])
    assert [s["repeat"] for s in samples] == [0, 0, 1, 1]
    assert {"prediction", "reference", "correct", "ttft_s", "e2e_s"} <= set(samples[0])
    report = (out / "report.md").read_text()
    assert "| tiny-llava | torch | none | shapes-vqa | 2 |" in report
    for png in ("accuracy.png", "latency.png"):
        Image.open(out / png).verify()
    assert no_temp_files(out)


def test_eval_shares_the_path_with_one_pass(tiny_llava, tmp_path, monkeypatch):
    calls = []
    generate = TorchBackend.generate
    monkeypatch.setattr(TorchBackend, "generate", lambda self, reqs, params: calls.append(len(reqs)) or generate(self, reqs, params))
    (row,) = run_eval(config(tiny_llava, repeats=3), tmp_path, progress=False)
    assert calls == [1, 1]  # no warm-up, no repeats
    assert row["mode"] == "eval" and row["roofline_decode_tok_s"] is None and 0 <= row["accuracy"] <= 1
    assert "TTFT" not in (tmp_path / "report.md").read_text()


def test_failing_cell_stops_the_run_and_keeps_finished_cells(tiny_llava, tmp_path):
    # the tiny model has 2 decoder layers: the second cell fails when its method is applied at load
    with pytest.raises(EdgelmmError, match=r"cell tiny-llava / torch / fastv\(k=5, keep=0.5\) / shapes-vqa failed: .*k=5 is beyond.*rerun"):
        run_bench(config(tiny_llava, methods=["none", "fastv(k=5, keep=0.5)"]), tmp_path, progress=False)
    assert [r["method"] for r in lines(tmp_path / "results.jsonl")] == ["none"]
    assert no_temp_files(tmp_path)


def test_matrix_problems_fail_before_any_model_loads(tmp_path):
    with pytest.raises(EdgelmmError, match="unknown method 'nope'"):
        run_bench(config("no-such-model", methods=["nope"]), tmp_path, progress=False)
    with pytest.raises(EdgelmmError, match="'none' takes no settings"):
        run_bench(config("no-such-model", methods=["none(x=1)"]), tmp_path, progress=False)
    with pytest.raises(EdgelmmError, match="AWQ needs calibration data"):
        run_bench(config("no-such-model", methods=["awq(bits=4)"]), tmp_path, progress=False)
    with pytest.raises(EdgelmmError, match="two cells of the matrix are the same"):
        run_bench(config("no-such-model", tasks=["shapes-vqa", "shapes-vqa"]), tmp_path, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


CHILD = """
import sys, time
from pathlib import Path
import torch
from edgelmm.backends.torch_backend import TorchBackend
from edgelmm.bench import bench_config_from_args, run_bench

model, out = sys.argv[1], Path(sys.argv[2])
generate = TorchBackend.generate

def generate_then_hang(self, requests, params):
    if (out / "results.jsonl").exists():  # the first cell is written: hang inside the second
        (out / "hanging").touch()
        time.sleep(600)
    return generate(self, requests, params)

TorchBackend.generate = generate_then_hang
torch.set_num_threads(1)  # as the suite's conftest does: toy matmuls on a busy machine
config = bench_config_from_args(model, tasks=["shapes-vqa", "shapes-caption"], samples=2, device="cpu", max_new_tokens=3)
run_bench(config.model_copy(update={"warmup": 1}), out, progress=False)
"""


def test_resume_after_kill_skips_finished_cells(tiny_llava, tmp_path, monkeypatch):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_llava), str(out)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "hanging").exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first cell did not finish in time"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    first = (out / "results.jsonl").read_text()
    assert [r["task"] for r in map(json.loads, first.splitlines())] == ["shapes-vqa"]
    assert no_temp_files(out)

    calls = []
    generate = TorchBackend.generate
    monkeypatch.setattr(TorchBackend, "generate", lambda self, reqs, params: calls.append(reqs[0].messages[-1]["content"][-1]["text"]) or generate(self, reqs, params))
    rows = run_bench(config(tiny_llava, tasks=["shapes-vqa", "shapes-caption"]), out, progress=False)
    assert [r["task"] for r in rows] == ["shapes-vqa", "shapes-caption"]
    assert calls == ["Describe the image."] * 3  # warm-up + 2 samples of the second cell only
    text = (out / "results.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 2
    assert rows[0] == json.loads(first)  # the first cell comes back from the file, not recomputed
    assert no_temp_files(out)

    calls.clear()
    assert run_bench(config(tiny_llava, tasks=["shapes-vqa", "shapes-caption"]), out, progress=False) == rows
    assert calls == []  # everything finished: nothing loads, nothing runs


def test_a_folder_with_results_of_other_settings_is_refused_unless_appending(tiny_llava, tmp_path):
    """Resume must never pass off a float32, batch-1 result as the answer to a bfloat16, batch-4 run."""
    first = run_bench(config(tiny_llava), tmp_path, progress=False)
    with pytest.raises(EdgelmmError, match=r"already holds tiny-llava / torch / none / shapes-vqa measured with other "
                                           r"settings \(batch_size 1 -> 2\).*--append"):
        run_bench(config(tiny_llava, batch_size=2), tmp_path, progress=False)
    longer = config(tiny_llava).model_copy(update={"sampling": config(tiny_llava).sampling.model_copy(update={"max_new_tokens": 4})})
    with pytest.raises(EdgelmmError, match="other settings"):
        run_bench(longer, tmp_path, progress=False)
    assert len(lines(tmp_path / "results.jsonl")) == 1
    both = run_bench(config(tiny_llava, batch_size=2), tmp_path, progress=False, append=True)
    assert both[0]["batch_size"] == 2 and both[0]["settings"] != first[0]["settings"]
    assert len(lines(tmp_path / "results.jsonl")) == 2
    assert run_bench(config(tiny_llava), tmp_path, progress=False) == first  # its own settings still resume


def test_runs_without_an_out_folder_do_not_share_one():
    from edgelmm.bench.runner import default_out

    base = config("shapes-vlm-s")
    assert default_out(base, "bench") == default_out(config("shapes-vlm-s"), "bench")
    assert default_out(base, "bench") != default_out(config("shapes-vlm-s", batch_size=4), "bench")
    assert default_out(base, "bench") != default_out(base, "eval") and default_out(base, "bench").parent == Path("runs")


def test_tasks_bring_their_own_answer_limit_unless_the_user_sets_one():
    from edgelmm.bench.runner import plan_cells

    def limits(cfg):
        return {c.task.name: c.sampling.max_new_tokens for c in plan_cells(cfg)}

    both = ["shapes-vqa", "shapes-caption"]
    assert limits(bench_config_from_args("m", tasks=both, samples=1)) == {"shapes-vqa": 24, "shapes-caption": 64}
    assert limits(bench_config_from_args("m", tasks=both, samples=1, max_new_tokens=5)) == {"shapes-vqa": 5, "shapes-caption": 5}
    per_task = bench_config_from_args("m", tasks=both, samples=1, max_new_tokens=5)
    per_task = per_task.model_copy(update={"tasks": [per_task.tasks[0], per_task.tasks[1].model_copy(update={"max_new_tokens": 40})]})
    assert limits(per_task) == {"shapes-vqa": 5, "shapes-caption": 40}


def test_answers_cut_at_the_limit_are_reported(tiny_llava, tmp_path, capsys):
    (row,) = run_eval(config(tiny_llava, tasks=["shapes-caption"], samples=4), tmp_path, progress=False)
    cut = sum(s["finish_reason"] == "length" for s in lines(tmp_path / row["samples_file"]))
    assert cut > 2, "the random tiny model should ramble past 3 tokens"
    assert f"{cut} of 4 answers of tiny-llava / torch / none / shapes-caption stopped at max_new_tokens=3" in capsys.readouterr().err


def test_bundled_experiment_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    from edgelmm.config import BenchConfig, load_yaml

    monkeypatch.chdir(tmp_path)
    assert load_yaml("configs/experiments/demo.yaml", BenchConfig).name == "demo"
    assert load_yaml("demo", BenchConfig).name == "demo"
    with pytest.raises(EdgelmmError, match="config file not found: nope.*bundled experiments configs: collab_demo, collab_routing, collab_routing_1l, demo"):
        load_yaml("nope", BenchConfig)


def test_a_misspelled_engine_option_fails_before_any_model_loads(tmp_path):
    base = config("no-such-model")
    model = base.models[0].model_copy(update={"options": {"decodee": "engine"}})
    with pytest.raises(EdgelmmError, match="unknown option.*decodee for the torch backend"):
        run_bench(base.model_copy(update={"models": [model]}), tmp_path, progress=False)
    grouped = base.models[0].model_copy(update={"options": {"openai": {"base_url": "http://x"}, "torch": {"decode": "engine"}}})
    assert plan_cells_of(base.model_copy(update={"models": [grouped]}))  # each backend reads its own group


def plan_cells_of(cfg):
    from edgelmm.bench.runner import plan_cells

    return plan_cells(cfg)
