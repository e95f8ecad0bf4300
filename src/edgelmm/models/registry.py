"""Adapters by `config.model_type`: a new family is one module plus one line in FAMILY_MODULES."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter

# Modules that define and register adapters; imported on first use.
FAMILY_MODULES = (
    "edgelmm.models.llava",
    "edgelmm.models.qwen2_vl",
    "edgelmm.models.qwen3_vl",
    "edgelmm.models.internvl",
    "edgelmm.models.causal_lm",
)

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def _ensure_loaded() -> None:
    """Import every family module (each registers itself). Not skipped when ADAPTERS is merely
    non-empty: importing one family module directly must not hide the others."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def supported_model_types() -> list[str]:
    _ensure_loaded()
    return sorted(ADAPTERS)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    _ensure_loaded()
    if model_type not in ADAPTERS:
        raise EdgelmmError(
            f"unsupported model_type '{model_type}'",
            f"supported: {', '.join(sorted(ADAPTERS))}; add an adapter in edgelmm/models/",
        )
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module, processor: Any | None = None) -> ModelAdapter:
    return adapter_class(model.config.model_type)(model, processor)
