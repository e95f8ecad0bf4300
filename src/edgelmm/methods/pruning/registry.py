"""Pruning methods by name. A new method is one module that defines a `Pruner` subclass under
`@register_pruner`, plus its line in PRUNER_MODULES; the decorator also makes it a method of
`edgelmm.methods`, so that specs such as `fastv(k=2, keep=0.25)` reach it from a model spec or a
benchmark matrix."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.methods import register_method
from edgelmm.methods.pruning.base import Pruner
from edgelmm.methods.pruning.runtime import prune
from edgelmm.models.base import ModelAdapter

# Modules that define and register pruning methods; imported with this package.
PRUNER_MODULES = (
    "edgelmm.methods.pruning.fastv",
    "edgelmm.methods.pruning.random_tokens",
    "edgelmm.methods.pruning.uniform",
    "edgelmm.methods.pruning.visionzip",
    "edgelmm.methods.pruning.divprune",
)

PRUNERS: dict[str, type[Pruner]] = {}
P = TypeVar("P", bound=type[Pruner])


def register_pruner(cls: P) -> P:
    """Register `cls` under `cls.name`, as a pruner and as an `edgelmm.methods` method."""

    def apply(model: nn.Module, adapter: ModelAdapter, **kwargs: Any) -> nn.Module:
        return prune(model, adapter, cls(**kwargs))

    PRUNERS[cls.name] = cls
    register_method(cls.name)(apply)
    return cls


def load_pruners() -> None:
    for module in PRUNER_MODULES:
        importlib.import_module(module)


def get_pruner(name: str, **kwargs: Any) -> Pruner:
    """A pruner by registered name, e.g. get_pruner("fastv", k=2, keep=0.25)."""
    load_pruners()
    if name not in PRUNERS:
        raise EdgelmmError(f"unknown pruning method '{name}'", f"available: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name](**kwargs)
