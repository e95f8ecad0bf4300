"""Optimization methods, registered by name and applied to a loaded model through its adapter.

A method spec is a string such as ``none``, ``fastv(k=2, keep=0.25)`` or
``awq(w_bit=4, group=128)``; `parse_method` turns it into a name and keyword arguments and
`apply_method` runs the registered function. Methods live in sub-packages (pruning,
quantization, speculative) and register themselves with `register_method`.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter

Apply = Callable[..., nn.Module]  # (model, adapter, **kwargs) -> model

METHODS: dict[str, Apply] = {}
# Sub-packages that register methods when imported; later work appends here.
METHOD_MODULES: list[str] = ["edgelmm.methods.pruning", "edgelmm.methods.quantization"]


def register_method(name: str) -> Callable[[Apply], Apply]:
    def wrap(fn: Apply) -> Apply:
        METHODS[name] = fn
        return fn

    return wrap


@register_method("none")
def _none(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    return model


def _ensure_loaded() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'fastv(k=2, keep=0.25)' -> ('fastv', {'k': 2, 'keep': 0.25})."""
    text = spec.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        return node.id, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            kwargs = None
        if kwargs is not None and len(kwargs) == len(node.keywords):
            return node.func.id, kwargs
    raise EdgelmmError(
        f"cannot parse method '{spec}'",
        "write a name with keyword arguments, e.g. none or fastv(k=2, keep=0.25)",
    )


def available_methods() -> list[str]:
    _ensure_loaded()
    return sorted(METHODS)


def check_method(spec: str) -> tuple[str, dict[str, Any]]:
    name, kwargs = parse_method(spec)
    _ensure_loaded()
    if name not in METHODS:
        raise EdgelmmError(f"unknown method '{name}' in '{spec}'", f"available: {', '.join(sorted(METHODS))}")
    return name, kwargs


def apply_method(spec: str, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    name, kwargs = check_method(spec)
    try:
        return METHODS[name](model, adapter, **kwargs)
    except TypeError as exc:
        raise EdgelmmError(f"bad arguments for method '{spec}': {exc}") from None
