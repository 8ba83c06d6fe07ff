"""The package's shape: imports point one way (no cycle), no private name crosses a module, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import flexora_tune

PACKAGE = Path(flexora_tune.__file__).parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of the package's own modules, wherever it
    stands in the file (function-level imports count: they are cycles that wait for their first call)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if target.split(".")[0] != "flexora_tune":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules:
                found.extend((m, []) for m in submodules)
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                found.append((target, rest))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "flexora_tune")
    return found


GRAPH = {name: sorted({m for m, _ in _imports(name, path) if m != name}) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in GRAPH:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_walk_sees_the_package():
    assert "flexora_tune.flexora.loop" in MODULES and "flexora_tune.training" in GRAPH["flexora_tune.finetune"]


def test_no_import_cycle_in_the_package():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_no_private_name_is_imported_from_another_module():
    crossing = [f"{name}: from {target} import {n}" for name, path in MODULES.items()
                for target, names in _imports(name, path) for n in names if n.startswith("_") and target != name]
    assert crossing == []


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
