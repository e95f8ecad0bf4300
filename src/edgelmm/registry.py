"""Names -> plug-ins, resolved lazily: the one registry behind every plug-in point.

Each table maps a name to a "module:attr" target that is imported only when the name is asked
for, so importing edgelmm needs no optional engine, and listing names imports nothing. The
built-in entries are the tables below: a new backend, method, model family, task or
calibration source is one module plus one line here. Code outside the package registers its own
with `register` (from Python) or as a plug-in module:

- a package's entry point in the group ``edgelmm.plugins`` (``my_vlm = "my_pkg.edgelmm_plugin"``),
  imported the first time any registry is read;
- ``load_plugin("my_pkg.plugin")`` or ``load_plugin("path/to/plugin.py")``, which is what
  ``edgelmm --plugin ...`` does.

A plug-in module registers what it brings when it is imported, e.g.
``MODEL_FAMILIES.register("my_vlm", MyAdapter)``.

Specs: `parse_spec("fastv(k=2, keep=0.25)")` -> ("fastv", {"k": 2, "keep": 0.25}), and
`Registry.build(spec)` constructs the named class with those keywords, refusing unknown ones.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from edgelmm.errors import EdgelmmError

T = TypeVar("T")
PLUGIN_GROUP = "edgelmm.plugins"
_plugins_loaded = False


class Registry(Generic[T]):
    """name -> object, where an entry is the object itself or a lazy "module:attr" target."""

    def __init__(self, kind: str, entries: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, str | T] = dict(entries or {})

    def register(self, name: str, target: str | T | None = None) -> Any:
        """`register(name, obj_or_target)`, or `@registry.register(name)` on a class or function.
        A later registration of a name replaces the earlier one (a plug-in may override a built-in)."""
        if target is None:
            def wrap(obj: T) -> T:
                self._entries[name] = obj
                return obj

            return wrap
        self._entries[name] = target
        return target

    def names(self) -> list[str]:
        _load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _load_entry_points()
        return name in self._entries

    def get(self, name: str) -> T:
        _load_entry_points()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise EdgelmmError(f"unknown {self.kind} '{name}'", f"{hint}available: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def items(self) -> Iterator[tuple[str, T]]:
        """Every entry, resolved (this imports them all)."""
        for name in self.names():
            yield name, self.get(name)

    def build(self, spec: str) -> Any:
        """The object a spec such as 'fastv(k=2, keep=0.25)' names, constructed from its keywords."""
        name, kwargs = parse_spec(spec, self.kind)
        cls: Any = self.get(name)
        return construct(cls, kwargs, f"{self.kind} '{name}'")


def parse_spec(spec: str, kind: str = "spec") -> tuple[str, dict[str, Any]]:
    """'fastv(k=2, keep=0.25)' -> ('fastv', {'k': 2, 'keep': 0.25}); values are Python literals."""
    text = spec.strip()
    try:
        node: ast.expr | None = ast.parse(text, mode="eval").body
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
        f"cannot parse {kind} '{spec}'",
        "write a name with keyword arguments whose values are literals, e.g. none or fastv(k=2, keep=0.25)",
    )


def construct(cls: Callable[..., Any], kwargs: dict[str, Any], what: str) -> Any:
    """`cls(**kwargs)`, with unknown keywords named (and the nearest known one suggested) instead
    of a TypeError. Dataclasses are checked against their init fields, other classes against
    their signature."""
    if dataclasses.is_dataclass(cls):
        known = [f.name for f in dataclasses.fields(cls) if f.init]
    else:
        parameters = inspect.signature(cls).parameters.values()
        known = [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in kwargs if k not in known]
    if unknown and not known:
        raise EdgelmmError(f"{what} takes no settings, got {', '.join(unknown)}", f"write just {what.split()[-1]}")
    if unknown:
        renamed: dict[str, str] = getattr(cls, "renamed", {})
        suggestion = renamed.get(unknown[0]) or next(iter(difflib.get_close_matches(unknown[0], known, n=1)), None)
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        raise EdgelmmError(f"{what}: unknown setting(s) {', '.join(unknown)}", f"{hint}known: {', '.join(known)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise EdgelmmError(f"{what}: {exc}") from None


# ---------------------------------------------------------------- plug-ins


def _load_entry_points() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as exc:  # a broken plug-in must say which one it is
            raise EdgelmmError(f"plug-in '{point.name}' ({point.value}) failed to load: {exc}",
                               "fix or uninstall the package that declares it") from None


def load_plugin(name_or_path: str) -> Any:
    """Import a plug-in module by dotted name or by the path of a .py file; it registers itself."""
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise EdgelmmError(f"plug-in file not found: {path}")
        module_name = f"edgelmm_plugin_{path.stem}"
        if module_name in sys.modules:  # a plug-in registers once per process
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise EdgelmmError(f"plug-in {path} failed to load: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(name_or_path)
    except ImportError as exc:
        raise EdgelmmError(f"cannot import plug-in '{name_or_path}': {exc}",
                           "give an importable module name or the path of a .py file") from None


# ---------------------------------------------------------------- the tables

BACKENDS: Registry[Any] = Registry("backend", {
    "torch": "edgelmm.backends.torch_backend:TorchBackend",
    "openai": "edgelmm.backends.openai_backend:OpenAIBackend",
    "llamacpp": "edgelmm.backends.llamacpp_backend:LlamaCppBackend",
    "onnx": "edgelmm.backends.onnx_backend:OnnxBackend",
    "vllm": "edgelmm.backends.vllm_backend:VLLMBackend",
    "lmdeploy": "edgelmm.backends.lmdeploy_backend:LMDeployBackend",
})

METHODS: Registry[Any] = Registry("method", {
    "none": "edgelmm.methods.base:NoMethod",
    "fastv": "edgelmm.methods.pruning.fastv:FastV",
    "random": "edgelmm.methods.pruning.random_tokens:RandomTokens",
    "uniform": "edgelmm.methods.pruning.uniform:Uniform",
    "visionzip": "edgelmm.methods.pruning.visionzip:VisionZip",
    "divprune": "edgelmm.methods.pruning.divprune:DivPrune",
    "rtn": "edgelmm.methods.quantization.config:RTNConfig",
    "awq": "edgelmm.methods.quantization.config:AWQConfig",
})

# Model families: each adapter class names the config.model_type values it serves.
MODEL_FAMILIES: Registry[Any] = Registry("model family", {
    "llava": "edgelmm.models.llava:LlavaAdapter",
    "qwen2_vl": "edgelmm.models.qwen2_vl:Qwen2VLAdapter",
    "qwen3_vl": "edgelmm.models.qwen3_vl:Qwen3VLAdapter",
    "internvl": "edgelmm.models.internvl:InternVLAdapter",
    "causal_lm": "edgelmm.models.causal_lm:CausalLMAdapter",
})

TASKS: Registry[Any] = Registry("task", {
    "shapes-vqa": "edgelmm.tasks.shapes:ShapesVQA",
    "shapes-caption": "edgelmm.tasks.shapes:ShapesCaption",
    "vqa-jsonl": "edgelmm.tasks.files:VqaJsonl",
    "mc-jsonl": "edgelmm.tasks.files:McJsonl",
})

# Named calibration sources for AWQ (functions of the CalibrationConfig and the adapter);
# files, dataset folders and hf:NAME need no entry.
CALIBRATION_SOURCES: Registry[Any] = Registry("calibration source", {
    "shapes": "edgelmm.demo.calibration:caption_texts",
    "shapes-images": "edgelmm.demo.calibration:image_batches",
})

# Confidence strategies of edge-cloud routing (edgelmm.collab.confidence).
CONFIDENCE: Registry[Any] = Registry("confidence strategy", {
    "max_prob": "edgelmm.collab.confidence:MaxProb",
    "entropy": "edgelmm.collab.confidence:Entropy",
    "temperature": "edgelmm.collab.confidence:Temperature",
    "top_mass": "edgelmm.collab.confidence:TopMass",
    "ensemble": "edgelmm.collab.confidence:Ensemble",
})
