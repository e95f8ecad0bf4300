"""What a method is: a small typed config object that knows how to apply itself.

    FastV(k=2, keep=0.25)            # visual-token pruning
    AWQConfig(bits=4, group_size=128, calibration="my_texts.jsonl")
    apply(model, adapter, FastV(k=2, keep=0.25))  # -> the model, changed in place

A method is a dataclass whose fields are its settings: the keywords of its spec string
(`'fastv(k=2, keep=0.25)'`, parsed once by `parse_method`), its YAML form and its `str()` are the
same names. What applies it is named by its `runner` ("module:function", called as
`function(model, adapter, method)`), so a config module never imports the code that runs it
(as torchao's configs and their handlers). Built-in methods are listed in
`edgelmm.registry.METHODS`; a new one is a subclass with a `name` and a `runner`, plus its line
there (or `METHODS.register(name, cls)` from outside).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

from torch import nn

from edgelmm.models.base import ModelAdapter
from edgelmm.registry import METHODS


class Method:
    """Base of every method. Subclasses are dataclasses (kw_only) with a `name` and an `apply`."""

    name: ClassVar[str] = "method"
    runner: ClassVar[str] = ""  # "module:function" that applies the method: function(model, adapter, method)
    # Settings shown in the spec even at their default (the ones a reader needs to see).
    shown: ClassVar[tuple[str, ...]] = ()
    # Old spellings of settings, named in the error that refuses them.
    renamed: ClassVar[dict[str, str]] = {}

    def apply(self, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        """Apply the method to a loaded model (in place) and return it."""
        if not self.runner:
            raise NotImplementedError(f"{type(self).__name__} names no runner and does not define apply()")
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(model, adapter, self)

    def settings(self) -> dict[str, Any]:
        """The settings that recreate this method: those in `shown` and those off their default."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if f.name in self.shown or value != default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        settings = self.settings()
        if not settings:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_literal(v)}' for k, v in settings.items())})"


def _literal(value: Any) -> str:
    """A setting as the Python literal a spec string holds: a nested config as the dict of its
    fields off their default (or its first field alone, when only that one is set)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        changed = {f.name: getattr(value, f.name) for f in fields
                   if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
        if list(changed) == [fields[0].name]:
            return repr(changed[fields[0].name])
        return repr(changed)
    return repr(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoMethod(Method):
    """`none`: the model as loaded (the baseline cell of a matrix)."""

    name: ClassVar[str] = "none"

    def apply(self, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        return model


def parse_method(spec: str | Method) -> Method:
    """'fastv(k=2, keep=0.25)' -> FastV(k=2, keep=0.25); a method object is returned as it is."""
    if isinstance(spec, Method):
        return spec
    return METHODS.build(spec)


def apply(model: nn.Module, adapter: ModelAdapter, method: str | Method) -> nn.Module:
    """Apply one method (an object or its spec) to a loaded model through its adapter."""
    return parse_method(method).apply(model, adapter)


def available_methods() -> list[str]:
    return METHODS.names()
