"""Backends by name. Optional engines register a lazy factory so importing edgelmm needs none."""

from __future__ import annotations

import importlib
from typing import Any

from edgelmm.backends.base import Backend
from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError

# name -> "module:Class"; the module is imported only when the backend is asked for.
BACKENDS: dict[str, str] = {
    "torch": "edgelmm.backends.torch_backend:TorchBackend",
    "openai": "edgelmm.backends.openai_backend:OpenAIBackend",
    "llamacpp": "edgelmm.backends.llamacpp_backend:LlamaCppBackend",
    "vllm": "edgelmm.backends.vllm_backend:VLLMBackend",
    "lmdeploy": "edgelmm.backends.lmdeploy_backend:LMDeployBackend",
}


def register_backend(name: str, target: str) -> None:
    BACKENDS[name] = target


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise EdgelmmError(f"unknown backend '{name}'", f"choose one of: {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load(model: str | ModelSpec, backend: str = "torch", **spec: Any) -> Backend:
    """Create a backend and load a model into it: `load("shapes-vlm-s", device="cpu")`."""
    if isinstance(model, str):
        model = ModelSpec(path=model, **spec)
    engine = backend_class(backend)()
    engine.load(model)
    return engine
