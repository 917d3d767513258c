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


MODULES = {_module(path) for path in SRC.rglob("*.py")}


def _package(path: Path) -> list[str]:
    """The package a module's relative imports start from (dpokit.data -> ["data"]; dpokit -> [])."""
    return list(path.relative_to(SRC).parent.parts)


def _targets(node: ast.AST, path: Path) -> set[str]:
    """The dpokit modules one import statement names, "" for the package itself; every form:
    `import dpokit.x`, `import dpokit`, `from dpokit import x`, `from dpokit.x import y`, and
    relative imports resolved against the importing module's package. `from P import name` names
    the module P.name where that is a module, else P."""
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("dpokit").lstrip(".") for a in node.names
                if a.name == "dpokit" or a.name.startswith("dpokit.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        here = _package(path)
        if node.level - 1 > len(here):
            raise AssertionError(f"{path}: relative import beyond the dpokit package")
        base = here[: len(here) - (node.level - 1)]
        package = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "dpokit" or (node.module or "").startswith("dpokit."):
        package = node.module.removeprefix("dpokit").lstrip(".")
    else:
        return set()
    found = set()
    for alias in node.names:
        submodule = f"{package}.{alias.name}" if package else alias.name
        found.add(submodule if submodule in MODULES else package)
    return found


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets |= _targets(node, path)
        graph[_module(path)] = {t or "__init__" for t in targets}  # "" is the package dpokit itself
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


def test_every_import_form_is_read():
    """Catches: upward imports written `from dpokit import scoring` or `from ..cli import main`
    (data/order.py), which an earlier version of this test dropped."""
    source = ("import dpokit.eval.report\nimport dpokit\nfrom dpokit import scoring\nfrom dpokit.train import loop\n"
              "from ..cli import main\nfrom . import batching\nfrom .tokenize import TokenizedPair\n"
              "from dpokit.config import TrainConfig\nimport torch\nfrom torch import nn\n")
    order = SRC / "data" / "order.py"
    found = set().union(*(_targets(node, order) for node in ast.walk(ast.parse(source))))
    assert found == {"eval.report", "", "scoring", "train.loop", "cli", "data.batching", "data.tokenize", "config"}
    assert [_layer(t or "__init__") > _layer("data.order") for t in sorted(found)] == [
        True, True, False, False, False, True, True, True]  # "", cli, config, data x2, eval, scoring, train
