"""Adapters by `config.model_type`, over the model families of `edgelmm.registry.MODEL_FAMILIES`.

A new family is one adapter module plus its line there; a family from outside the package is
registered with `register_adapter(MyAdapter)` (in a plug-in module, see `edgelmm.registry`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter
from edgelmm.registry import MODEL_FAMILIES


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class under its `family`; usable as a decorator."""
    MODEL_FAMILIES.register(cls.family, cls)
    return cls


def _by_model_type() -> dict[str, type[ModelAdapter]]:
    found: dict[str, type[ModelAdapter]] = {}
    for _, cls in MODEL_FAMILIES.items():
        for model_type in cls.model_types:
            found.setdefault(model_type, cls)
    return found


def supported_model_types() -> list[str]:
    return sorted(_by_model_type())


def adapter_class(model_type: str) -> type[ModelAdapter]:
    adapters = _by_model_type()
    if model_type not in adapters:
        raise EdgelmmError(
            f"unsupported model_type '{model_type}'",
            f"supported: {', '.join(sorted(adapters))}; a new family is an adapter registered in edgelmm.registry.MODEL_FAMILIES",
        )
    return adapters[model_type]


def get_adapter(model: nn.Module, processor: Any | None = None) -> ModelAdapter:
    config: Any = model.config
    return adapter_class(str(config.model_type))(model, processor)
