"""What this machine offers: versions, devices, memory, optional engines and bundled models."""

from __future__ import annotations

import importlib.util
import platform
import sys

import psutil

# Optional engines and libraries: import name -> the extra that installs it.
OPTIONAL = {
    "vllm": "vllm",
    "lmdeploy": "lmdeploy",
    "llama_cpp": "llamacpp",
    "httpx": "openai",
    "fastapi": "serve",
    "uvicorn": "serve",
    "compressed_tensors": "quant",
    "gguf": "llamacpp",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    width = max(len(k) for k, _ in [header, *rows])
    lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * len(header[1])}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(module, [module]):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "installed"


def environment() -> list[tuple[str, str]]:
    import torch
    import transformers

    mem = psutil.virtual_memory()
    rows = [
        ("python", f"{sys.version.split()[0]} ({platform.machine()}, {platform.system()})"),
        ("edgelmm", _version("edgelmm") or "source"),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("cpu threads", f"{torch.get_num_threads()} (of {psutil.cpu_count()} logical cores)"),
        ("memory", f"{mem.total / 2**30:.1f} GiB total, {mem.available / 2**30:.1f} GiB available"),
        ("cuda", f"available (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "not available"),
    ]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        rows.append((f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"))
    for module, extra in OPTIONAL.items():
        found = _version(module)
        rows.append((module, found if found else f"missing (pip install 'edgelmm[{extra}]')"))
    rows += backend_status(torch.cuda.is_available())
    return rows


# Row label -> (modules it imports, needs CUDA): each backend, and the server of `edgelmm serve`.
BACKEND_NEEDS = {
    "backend torch": ((), False), "backend openai": (("httpx",), False), "backend llamacpp": (("llama_cpp",), False),
    "backend onnx": (("onnxruntime",), False),
    "backend vllm": (("vllm",), True), "backend lmdeploy": (("lmdeploy",), True), "edgelmm serve": (("fastapi", "uvicorn"), False),
}


def backend_status(cuda: bool) -> list[tuple[str, str]]:
    """Whether each backend can run here, from installed packages and CUDA, without importing them."""
    rows = []
    for name, (modules, needs_cuda) in BACKEND_NEEDS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            rows.append((name, f"unavailable: {', '.join(missing)} missing (pip install 'edgelmm[{OPTIONAL[missing[0]]}]')"))
        elif needs_cuda and not cuda:
            rows.append((name, "unavailable: needs a CUDA GPU"))
        else:
            rows.append((name, "available"))
    return rows


def environment_table() -> str:
    return _table(environment(), ("component", "status"))


def models_table() -> str:
    from edgelmm.demo import DEMO_MODELS, checkpoint_path

    rows = []
    for name in DEMO_MODELS:
        path = checkpoint_path(name)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.exists() else 0
        rows.append((name, f"{path} ({size / 1e6:.1f} MB of weights)" if size else f"{path} (missing)"))
    table = _table(rows, ("bundled model", "checkpoint"))
    return f"{table}\n\n{support_table()}"


def support_table() -> str:
    """Which command takes which model_type: bench, eval, serve and quantize take every family
    with an adapter; plan sizes fewer; export gguf writes llama.cpp's llama and qwen2 language
    models (a VLM's language model alone, where it is one of those)."""
    from edgelmm.export.gguf import ARCHES
    from edgelmm.registry import MODEL_FAMILIES

    header = ("model_type", "family", "bench eval serve quantize", "plan", "export gguf")
    rows = []
    for family, cls in MODEL_FAMILIES.items():
        for model_type in cls.model_types:
            if cls.multimodal:
                gguf = "language model" if family in ("llava", "internvl") else "no (M-RoPE)"
            else:
                gguf = "yes" if model_type in ARCHES else "no"
            rows.append((model_type, family, "yes", "yes" if model_type in cls.planned_types else "no", gguf))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, tuple("-" * w for w in widths)]]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in sorted(rows)]
    return "\n".join(lines)
