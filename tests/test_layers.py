"""The layering of src/edgelmm holds: no import cycle between modules (top-level and function-local
imports alike; a package's __init__ is a module of its own), and no import that runs up the layers
models < methods < backends < serve / bench / collab / export < cli (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RANKS = {"models": 1, "methods": 2, "backends": 3, "serve": 4, "bench": 4, "collab": 4, "export": 4, "cli": 5}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "edgelmm").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name) if name.startswith("edgelmm") else None
                if target and target != module:
                    edges[module].add(target)
    return edges


def test_no_import_cycles():
    edges = imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_runs_up_the_layers():
    def layer(module: str) -> int | None:
        parts = module.split(".")
        return RANKS.get(parts[1]) if len(parts) > 1 else None

    upward = sorted((a, b) for a, targets in imports().items() for b in targets
                    if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))
    assert not upward, "imports up the layers: " + ", ".join(f"{a} -> {b}" for a, b in upward)
