"""The collab commands as a user runs them: one line and exit 1 for bad input, real answers otherwise."""

from __future__ import annotations

import io

import pytest

from edgelmm.cli import main
from edgelmm.collab.policy import load_policy
from edgelmm.demo.shapes import generate
from tests.collab.conftest import MODEL


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--cloud", "http://127.0.0.1:1/v1", "--cloud-timeout-s", "1"], "cannot reach the cloud"),
    (["--threshold", "1.5"], "--threshold 1.5 is outside [0, 1]"),
    (["--policy", "nothing.yaml"], "neither a file nor a mode"),
    ([], "needs a cloud"),
    (["--cloud", "ftp://x"], "not an http(s) URL"),
])
def test_collab_serve_refuses_bad_input_at_start(capsys, argv, message):
    code, _, err = run(capsys, "collab", "serve", "--edge", MODEL, "--port", "8765", *argv)
    assert code == 1 and message in err and err.count("\n") == 1


def test_collab_run_and_calibrate(capsys, tmp_path, cloud_url):
    sample = generate(1, seed=6)[0]
    sample.image.save(tmp_path / "q.png")
    code, out, err = run(capsys, "collab", "run", "--edge", MODEL, "--cloud", cloud_url, "--device", "cpu",
                         "--policy", "escalate", sample.question, "--image", str(tmp_path / "q.png"))
    assert code == 0 and out.strip() == sample.answer and '"served_by": "cloud"' in err
    code, out, _ = run(capsys, "collab", "calibrate", "--edge", MODEL, "--cloud", cloud_url, "--device", "cpu",
                       "--samples", "6", "--strategy", "entropy", "--target-share", "0.5", "--out", str(tmp_path / "p.yaml"))
    assert code == 0 and "cloud share" in out
    policy = load_policy(tmp_path / "p.yaml")
    assert policy.strategy == "entropy" and policy.fitted["samples"] == 6 and policy.fitted["cloud_share"] <= 0.5
    code, _, err = run(capsys, "collab", "calibrate", "--edge", MODEL, "--cloud", cloud_url, "--samples", "6",
                       "--target-share", "0.5", "--out", str(tmp_path / "p.yaml"))
    assert code == 1 and "already exists" in err
    code, _, _ = run(capsys, "collab", "calibrate", "--edge", MODEL, "--cloud", cloud_url, "--device", "cpu", "--samples", "6",
                     "--target-quality", "0.9", "--confidence-level", "0.9", "--out", str(tmp_path / "sure.yaml"))
    assert code == 0 and load_policy(tmp_path / "sure.yaml").fitted["confidence_level"] == 0.9
    code, _, err = run(capsys, "collab", "calibrate", "--edge", MODEL, "--cloud", cloud_url, "--samples", "6",
                       "--target-quality", "0.9", "--confidence-level", "1.5", "--out", str(tmp_path / "bad.yaml"))
    assert code == 1 and "confidence level 1.5 is outside (0, 1)" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.yaml").exists()


def test_chat_answers_and_says_who(capsys, monkeypatch, tmp_path, cloud_url):
    sample = generate(1, seed=7)[0]
    sample.image.save(tmp_path / "q.png")
    lines = f"/image {tmp_path / 'q.png'}\n{sample.question}\n/image {tmp_path / 'missing.png'}\n/reset\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, _ = run(capsys, "chat", "--edge", MODEL, "--cloud", cloud_url, "--device", "cpu", "--threshold", "1.0")
    assert code == 0
    assert f"cloud> {sample.answer}" in out and "confidence" in out and "cannot read the image" in out
    assert "conversation cleared" in out
