"""The exported pair in llama-cpp-python's own OpenAI server (its `mtmd` chat handler), measured
through edgelmm's openai backend against the torch backend on the same shapes questions.

    pip install 'llama-cpp-python[server]'   # its server's extra: sse-starlette, starlette-context
    python benchmarks/engines/llama_cpp_server.py --samples 100 > benchmarks/engines/results/llama-cpp-server.log
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from edgelmm import ModelSpec, Request, SamplingParams, load
from edgelmm.demo import shapes
from edgelmm.export.gguf import export_gguf
from edgelmm.export.mmproj import export_mmproj
from edgelmm.serve.server import free_port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-vlm-s")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    lm = export_gguf(args.model, work / "m.gguf").path
    projector = export_mmproj(args.model, work / "m-mmproj.gguf").path
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(lm), "--clip_model_path", str(projector),
               "--chat_format", "mtmd", "--port", str(port), "--n_threads", "2"]
    print("#", " ".join(command[1:]))
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                name = httpx.get(url + "/models", timeout=2).json()["data"][0]["id"]
                break
            except (httpx.HTTPError, KeyError, ValueError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("llama_cpp.server did not start (is its server extra installed?)") from None
                time.sleep(0.5)
        remote = load(ModelSpec(path=name, options={"base_url": url}), backend="openai")  # checks that images count
        local = load(ModelSpec(path=args.model, device="cpu"))
        greedy = SamplingParams(max_new_tokens=16)
        same = right = right_local = 0
        questions = shapes.generate(args.samples, 0)
        for q in questions:
            request = Request.chat(q.question, [q.image])
            there, here = remote.generate([request], greedy)[0].text.strip(), local.generate([request], greedy)[0].text.strip()
            same, right, right_local = same + (there == here), right + (there == q.answer), right_local + (here == q.answer)
        print(f"{args.model}: {args.samples} shapes-vqa questions; llama_cpp.server (mtmd) {right} right, torch {right_local} "
              f"right, {same} answers identical")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
