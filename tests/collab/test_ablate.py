"""The ablation runner end to end on a small matrix: every cell through the real path, resumable,
settings guarded, with the report, the fitted policies and the plots."""

from __future__ import annotations

import json

import pytest
import yaml

from edgelmm.collab.ablate import AblateConfig, run_ablation
from edgelmm.collab.policy import load_policy
from edgelmm.config import load_yaml
from edgelmm.errors import EdgelmmError
from tests.collab.conftest import MODEL


def config_file(tmp_path, cloud_url: str, **changes) -> str:
    data = {"name": "tiny", "edge": {"path": MODEL, "device": "cpu"}, "cloud": {"url": cloud_url},
            "tasks": [{"name": "shapes-vqa", "samples": 6, "seed": 0}], "rtts_ms": [0, 5],
            "strategies": ["max_prob", "temperature"], "policy": {"strategy": "max_prob"},
            "calibration": {"seed": 1, "samples": 6, "target_share": 0.5}, "warmup": 1, **changes}
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_matrix_resume_and_report(tmp_path, cloud_url):
    config = load_yaml(config_file(tmp_path, cloud_url), AblateConfig)
    out = tmp_path / "runs"
    report = run_ablation(config, out, progress=False)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 2 calibration runs; edge_only once; the six other presets at 2 RTTs
    assert len(records) == 15
    by = {(r["split"], r["preset"], r["rtt_ms"]): r for r in records}
    assert by[("test", "draft_verify", 0.0)]["cloud_share"] == 1.0  # the cloud's output, every request
    assert by[("test", "draft_verify", 0.0)]["cloud_passes"] < by[("test", "cloud_only", 0.0)]["cloud_passes"]
    assert "draft_verify" in by[("test", "baseline", 0.0)]["policy"]
    assert "draft_verify (generic)" in by[("test", "no_kv_cache", 0.0)]["policy"]
    assert "draft_verify" not in by[("test", "no_draft_verify", 0.0)]["policy"]
    verified = [json.loads(line) for line in (out / "cells" / "test-no_confidence-shapes-vqa-n6-s0-rtt0.jsonl").read_text().splitlines()]
    assert all(r["served_by"] == "draft_verify" and r["draft_verify"]["protocol"] == "native" for r in verified)
    assert by[("test", "cloud_only", 5.0)]["cloud_share"] == 1.0 and by[("test", "edge_only", 0.0)]["cloud_share"] == 0.0
    assert by[("test", "no_confidence", 0.0)]["cloud_share"] == 1.0
    assert by[("test", "cloud_only", 5.0)]["cloud_p50_ms"] >= 5.0  # the injected round trip is in the cloud's time
    assert by[("test", "baseline", 0.0)]["policy"].startswith("max_prob")
    rows = (out / "cells" / "test-edge_only-shapes-vqa-n6-s0-rtt0.jsonl").read_text().splitlines()
    assert len(rows) == 6 and json.loads(rows[0])["positions"]  # the edge's scores, for the curves
    policy = load_policy(out / "policies" / "shapes-vqa-temperature.yaml")
    assert policy.fitted["seed"] == 1 and policy.fitted["cloud_share"] <= 0.5
    text = report.read_text()
    assert "CPT(50 %)" in text and "`max_prob`" in text and "routing-shapes-vqa.png" in text
    assert (out / "routing-shapes-vqa.png").stat().st_size > 1000 and (out / "latency.png").exists()
    assert (out / "cloud_tokens.png").exists()

    before = (out / "results.jsonl").read_bytes()
    run_ablation(config, out, progress=False)  # everything done: nothing runs again
    assert (out / "results.jsonl").read_bytes() == before

    changed = load_yaml(config_file(tmp_path, cloud_url, warmup=0), AblateConfig)
    with pytest.raises(EdgelmmError, match="other settings"):
        run_ablation(changed, out, progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"presets": ["no_such"]}, "presets"),
    ({"strategies": ["entropie"]}, "unknown confidence strategy"),
    ({"rtts_ms": [-1]}, "rtts_ms must be >= 0"),
    ({"cloud": {}}, "exactly one of url"),
    ({"calibration": {"target_share": 0.2, "target_quality": 0.9}}, "one calibration target"),
])
def test_bad_configs(tmp_path, changes, message):
    with pytest.raises(EdgelmmError, match=message):
        load_yaml(config_file(tmp_path, "http://127.0.0.1:1/v1", **changes), AblateConfig)


def test_a_session_serves_its_own_cloud_in_a_process_of_its_own():
    import asyncio

    from edgelmm import ModelSpec
    from edgelmm.collab.policy import Policy
    from edgelmm.collab.session import CloudSpec, Session
    from edgelmm.config import SamplingParams
    from edgelmm.tasks import get_task

    task = get_task("shapes-vqa")

    async def run():
        async with Session(None, CloudSpec(serve=ModelSpec(path=MODEL, device="cpu"))) as session:
            rows = await session.run(task.samples(2, 0), task, Policy(mode="cloud"), SamplingParams(max_new_tokens=8))
            return rows, session._server

    rows, process = asyncio.run(run())
    assert [r["served_by"] for r in rows] == ["cloud", "cloud"] and process.poll() is not None  # stopped again


def test_the_bundled_demo_matrix_loads_by_name():
    config = load_yaml("collab_demo", AblateConfig)
    assert config.edge.path == "shapes-vlm-xs" and config.cloud.serve.path == "shapes-vlm-l"
    assert config.presets == ["cloud_only", "edge_only", "baseline", "no_confidence", "draft_verify", "no_draft_verify",
                              "no_kv_cache"]
    assert config.edge.options["prefix_cache_mb"] and config.cloud.serve.options["prefix_cache_mb"]


@pytest.mark.parametrize("name, edge, level", [("collab_routing", "shapes-vlm-thumb", None),
                                               ("collab_routing_1l", "shapes-vlm-thumb-1l", 0.9)])
def test_the_bundled_routing_matrices_load_by_name_with_their_routing_edges(name, edge, level):
    config = load_yaml(name, AblateConfig)
    assert config.edge.path == edge and config.cloud.serve.path == "shapes-vlm-l"
    assert config.calibration.confidence_level == level
    assert config.presets == ["cloud_only", "edge_only", "baseline", "no_confidence"]
    assert config.calibration.seed != config.tasks[0].seed
