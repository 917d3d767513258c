"""The package's layering (README, "Layout"): imports run downward only, and no module imports
itself back through others. Read from the source with `ast`, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dpokit"

# Lowest first. A module may import its own layer and the layers below, never one above.
LAYERS = [
    ("errors", "faults", "io", "folder_swap", "paths", "config", "settings_checks", "runinfo", "model_card", "hub", "trackers"),
    ("data",),
    ("model", "losses", "logratios", "metrics"),
    ("scoring",),
    ("train",),
    ("eval",),
    ("experiments",),
    ("cli", "__main__", "__init__"),
]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpokit"):
                targets.add(node.module.removeprefix("dpokit").lstrip("."))
            elif isinstance(node, ast.Import):
                targets.update(a.name.removeprefix("dpokit").lstrip(".") for a in node.names
                               if a.name.startswith("dpokit"))
        graph[_module(path)] = {t for t in targets if t}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"dpokit.{module} belongs to no layer: add it to LAYERS")


def test_every_import_runs_downward():
    upward = [f"dpokit.{a} imports dpokit.{b}" for a, targets in _imports().items() for b in targets
              if _layer(b) > _layer(a)]
    assert not upward, upward


def test_no_module_imports_itself_back():
    graph = _imports()
    known = set(graph)

    def resolve(name: str) -> str | None:  # `from dpokit.data import x` names the package dpokit.data
        return name if name in known else None

    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(filter(None, map(resolve, graph[node]))):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles
