"""`edgelmm serve` as a user runs it: a process on 127.0.0.1 that answers and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from edgelmm.serve.server import free_port
from tests.serve.conftest import MODEL


def test_serve_command(tiny_llava_path):
    port = free_port()
    command = [sys.executable, "-m", "edgelmm.cli", "serve", str(tiny_llava_path), "--port", str(port),
               "--served-model-name", MODEL, "--api-key", "k", "--max-tokens", "8", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() else "slow"
            time.sleep(0.2)
        headers = {"authorization": "Bearer k"}
        answer = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
        assert answer["usage"]["completion_tokens"] >= 1
        too_many = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9})
        assert too_many.status_code == 400
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output  # bound to loopback by default


@pytest.mark.parametrize("args,message", [
    (["serve", "no-such-model"], "model not found"),
    (["serve", "x.gguf", "--backend", "llamacpp"], "GGUF file not found"),
    (["serve", "m", "--backend", "tensorrt"], "unknown backend"),
    (["serve", "m", "--option", "novalue"], "bad --option"),
    (["serve", "shapes-vlm-s", "--port", "80000"], "--port 80000 is not a TCP port"),
    (["serve", "shapes-vlm-s", "--max-tokens", "-5"], "--max-tokens must be positive"),
    (["serve", "shapes-vlm-s", "--max-body-mb", "0"], "--max-body-mb must be positive"),
    (["serve", "shapes-vlm-s", "--allowed-local-media-path", "/no/such/dir"], "not a folder"),
    (["demo", "--samples", "-3"], "--samples must be at least 1"),
    (["demo", "--samples", "0"], "--samples must be at least 1"),
    (["bench", "--model", "shapes-vlm-s", "--base-url", "http://127.0.0.1:9/v1"], "no --backend openai"),
])
def test_serve_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "edgelmm.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("edgelmm: error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_fails_before_the_model_loads(tiny_llava_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "edgelmm.cli", "serve", "no-such-model", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "model not found" not in result.stderr
    assert time.monotonic() - start < 60


def test_bench_against_a_server_by_its_base_url(served, tmp_path, capsys):
    """--base-url points the openai backend at a running server, without a YAML file."""
    from edgelmm.cli import main

    code = main(["eval", "--model", MODEL, "--backend", "openai", "--base-url", served[0].url + "/v1", "--samples", "2",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and f"{MODEL}  openai" in out
