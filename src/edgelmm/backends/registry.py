"""Backends by name (`edgelmm.registry.BACKENDS`), and `load`, the library's front door."""

from __future__ import annotations

from typing import Any

from edgelmm.backends.base import Backend
from edgelmm.config import ModelSpec
from edgelmm.registry import BACKENDS


def backend_class(name: str) -> type[Backend]:
    return BACKENDS.get(name)


def load(model: str | ModelSpec, backend: str = "torch", **spec: Any) -> Backend:
    """Create a backend and load a model into it: `load("shapes-vlm-s", device="cpu")`."""
    if isinstance(model, str):
        model = ModelSpec(path=model, **spec)
    engine = backend_class(backend)()
    engine.load(model)
    return engine
