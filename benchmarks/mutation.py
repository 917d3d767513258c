"""Mutation testing of dpokit's core modules: how many deliberate bugs do the fast tests catch?

A small runner of our own (mutmut 3.8.1 was tried first: see docs/testing.md for why it was
dropped). For each module it

1. parses the source and lists every mutant: arithmetic operator swaps (+ -, * /, ** -> *),
   comparison swaps (< <=, > >=, == !=, is / is not, in / not in), and <-> or, a dropped `not`
   or unary minus, min <-> max, constants (n -> n + 1, x -> x + 1.0, True <-> False);
2. runs the module's fast tests once unmutated, tracing which of the module's lines run
   (a mutant on a line no test reaches survives without a run: "not covered");
3. for every covered mutant, forks a child from a parent that has imported torch, transformers and
   pytest (but no dpokit module, and has run no tensor op), serves the mutated source for that one
   module through an import hook, and runs the tests with `-x`; a failure or a timeout kills it.

Usage (it runs on demand, not in CI; one core, so run it niced on a shared machine):
    .venv/bin/python benchmarks/mutation.py                       # every module below
    .venv/bin/python benchmarks/mutation.py losses data/batching  # some of them
    .venv/bin/python benchmarks/mutation.py losses --list         # the mutants, without running
Prints the kill rate per module and every surviving mutant (line, change, the mutated line);
--json FILE writes the same as JSON.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dpokit"

# module (path under src/dpokit, no .py) -> the fast tests that cover it (pytest arguments).
MODULES: dict[str, list[str]] = {
    "losses": ["tests/test_losses.py", "tests/test_losses_core.py", "tests/test_losses_extreme.py",
               "tests/test_losses_dpop.py", "tests/test_loss_plan.py", "tests/test_losses_beta_dpo.py",
               "tests/test_mutation_kills_losses.py", "-k", "not sigterm and not cli"],
    "logratios": ["tests/test_losses.py", "tests/test_losses_core.py", "tests/test_losses_extreme.py",
                  "tests/test_loss_plan.py", "tests/test_losses_beta_dpo.py",
                  "tests/test_mutation_kills_losses.py", "-k", "not sigterm and not cli"],
    "data/batching": ["tests/test_layouts.py", "tests/test_logprobs.py", "tests/test_tokenize.py",
                      "tests/test_mutation_kills_batching.py"],
    "data/tokenize": ["tests/test_tokenize.py", "tests/test_tokenizer_conventions.py"],
    "data/special_tokens": ["tests/test_tokenize.py", "tests/test_tokenizer_conventions.py"],
    "model/logprobs": ["tests/test_logprobs.py", "tests/test_layouts.py", "tests/test_losses_ld_dpo.py",
                       "tests/test_losses_wpo.py", "tests/test_mutation_kills_logprobs.py", "tests/test_router_loss.py",
                       "-k", "not cli and not run_without"],
    "train/optim": ["tests/test_mutation_kills_optim.py"],
    "eval/sampling": ["tests/test_sampling.py"],
    "metrics": ["tests/test_metrics_meaning.py"],
}
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--no-header", "-o", "addopts="]

_BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
           ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_NAME_SWAPS = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum"}


@dataclass
class Mutant:
    index: int
    line: int
    end_line: int
    change: str
    status: str = "pending"  # killed, timeout, survived, not covered
    source_line: str = ""


def _docstring_ids(tree: ast.AST) -> set[int]:
    """ids of docstring constants (never mutated)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _skipped_ids(tree: ast.AST) -> set[int]:
    """ids of nodes inside annotations, f-strings and docstrings."""
    skip = _docstring_ids(tree)
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            roots.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            roots.append(node.returns)
        if isinstance(node, ast.JoinedStr):
            roots.append(node)
        for root in roots:
            skip.update(id(n) for n in ast.walk(root))
    return skip


def _constant_swap(value: object) -> object | None:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.0
    return None


def _alternatives(node: ast.AST, parent: ast.AST | None) -> list[tuple[str, object]]:
    """(description, how to apply) for every mutation of `node` itself."""
    out: list[tuple[str, object]] = []
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOPS:
        new = _BINOPS[type(node.op)]
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("op", new)))
    elif isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            if type(op) in _CMPOPS:
                new = _CMPOPS[type(op)]
                out.append((f"{type(op).__name__} -> {new.__name__}", ("cmp", k, new)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("op", new)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        out.append((f"drop {type(node.op).__name__}", ("unwrap",)))
    elif isinstance(node, ast.Constant):
        new = _constant_swap(node.value)
        if new is not None:
            out.append((f"{node.value!r} -> {new!r}", ("const", new)))
    elif isinstance(node, ast.Name) and node.id in _NAME_SWAPS and isinstance(parent, ast.Call):
        out.append((f"{node.id} -> {_NAME_SWAPS[node.id]}", ("name", _NAME_SWAPS[node.id])))
    elif isinstance(node, ast.Attribute) and node.attr in _NAME_SWAPS:
        out.append((f".{node.attr} -> .{_NAME_SWAPS[node.attr]}", ("attr", _NAME_SWAPS[node.attr])))
    return out


def _sites(tree: ast.AST) -> list[tuple[ast.AST, ast.AST | None, str, object]]:
    """Every (node, parent, description, action) in a fixed walk order."""
    skip = _skipped_ids(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    sites = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        parent = parents.get(id(node))
        for description, action in _alternatives(node, parent):
            where = ast.unparse(node)
            where = where if len(where) <= 50 else where[:47] + "..."
            sites.append((node, parent, f"{description} in `{where}`", action))
    return sites


def _apply(node: ast.AST, parent: ast.AST | None, action: tuple) -> None:
    kind = action[0]
    if kind == "op":
        node.op = action[1]()
    elif kind == "cmp":
        node.ops[action[1]] = action[2]()
    elif kind == "const":
        node.value = action[1]
    elif kind == "name":
        node.id = action[1]
    elif kind == "attr":
        node.attr = action[1]
    elif kind == "unwrap":  # replace the UnaryOp by its operand in its parent
        for field, value in ast.iter_fields(parent):
            if value is node:
                setattr(parent, field, node.operand)
            elif isinstance(value, list):
                setattr(parent, field, [node.operand if v is node else v for v in value])


def _statement_lines(tree: ast.AST) -> dict[int, tuple[int, int]]:
    """id(node) -> the lines of the innermost statement holding it (a compound statement's header only)."""
    spans: dict[int, tuple[int, int]] = {}

    def visit(node: ast.AST, span: tuple[int, int]) -> None:
        if isinstance(node, ast.stmt):
            body = getattr(node, "body", None)
            header_end = body[0].lineno - 1 if isinstance(body, list) and body and hasattr(body[0], "lineno") else None
            span = (node.lineno, max(node.lineno, header_end or node.end_lineno or node.lineno))
        spans[id(node)] = span
        for child in ast.iter_child_nodes(node):
            visit(child, span)

    visit(tree, (0, 0))
    return spans


def list_mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    lines, spans = source.splitlines(), _statement_lines(tree)
    return [Mutant(k, *spans[id(node)], description, source_line=lines[node.lineno - 1].strip())
            for k, (node, _parent, description, _action) in enumerate(_sites(tree))]


def mutated_source(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, parent, _description, action = _sites(tree)[index]
    _apply(node, parent, action)
    return ast.unparse(ast.fix_missing_locations(tree))


class _ServeSource(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: module `name` is compiled from `source` (its __file__ stays the real path)."""

    def __init__(self, name: str, path: Path, source: str) -> None:
        self.name, self.path, self.source = name, path, source

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=str(self.path))
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = str(self.path)
        exec(compile(self.source, str(self.path), "exec"), module.__dict__)


class _Recorder:
    """pytest plugin + tracer: the target file's lines each test runs ("<import>": at collection)."""

    def __init__(self, path: str) -> None:
        self.path, self.current, self.lines, self.seconds = path, "<import>", {}, {}

    def tracer(self, frame, event, arg):
        if frame.f_code.co_filename != self.path:
            return None
        seen = self.lines.setdefault(self.current, set())
        seen.add(frame.f_lineno)

        def local(frame, event, arg):
            if event == "line":
                self.lines.setdefault(self.current, set()).add(frame.f_lineno)
            return local

        return local

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = "<import>"


def _child(name: str, path: Path, source: str, tests: list[str], lines_file: str | None) -> int:
    """In the forked child: serve `source` as module `name`, run the tests, exit with pytest's code."""
    import pytest

    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    for stale in dependents(name):
        sys.modules.pop(stale, None)
    sys.meta_path.insert(0, _ServeSource(name, path, source))
    recorder = _Recorder(str(path)) if lines_file else None
    if recorder:
        sys.settrace(recorder.tracer)
    code = pytest.main([*tests, *PYTEST_ARGS], plugins=[recorder] if recorder else [])
    sys.settrace(None)
    if recorder:
        lines = {k: sorted(v) for k, v in recorder.lines.items()}
        Path(lines_file).write_text(json.dumps({"lines": lines, "seconds": recorder.seconds}))
    return int(code)


def run_once(name: str, path: Path, source: str, tests: list[str], timeout: float,
             lines_file: str | None = None) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout', seconds) of the tests against `source`, in a forked child."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(ROOT)
            code = _child(name, path, source, tests, lines_file)
        finally:
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ok = os.waitstatus_to_exitcode(status) == 0
            return ("passed" if ok else "failed"), time.monotonic() - start
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.05)


def run_module(module: str, tests: list[str], only: set[int] | None = None, jobs_at_once: int = 1,
               log=None) -> dict:
    """Baseline (with line tracing), then every covered mutant; returns the module's results."""
    log = log or functools.partial(print, flush=True)
    tests = [t for t in tests if not t.endswith(".py") or (ROOT / t).exists()]  # kill files may not exist yet
    path = SRC / f"{module}.py"
    name = "dpokit." + module.replace("/", ".")
    source = path.read_text()
    mutants = list_mutants(source)
    lines_file = str(ROOT / ".mutation-lines.json")
    status, base = run_once(name, path, source, tests, timeout=900, lines_file=lines_file)
    if status != "passed":
        raise SystemExit(f"{module}: the tests fail on the unmutated code ({status}); fix that first")
    recorded = json.loads(Path(lines_file).read_text())
    per_test = {test: set(lines) for test, lines in recorded["lines"].items()}
    seconds = recorded["seconds"]
    os.unlink(lines_file)
    timeout = max(30.0, 4 * base)
    log(f"{module}: {len(mutants)} mutants; tests take {base:.1f} s unmutated (traced); timeout {timeout:.0f} s")
    start = time.monotonic()
    jobs = []
    for m in mutants:
        if only is not None and m.index not in only:
            m.status = "skipped"
            continue
        span = set(range(m.line, m.end_line + 1))
        # Quickest first: with -x, a killed mutant stops at its first failing test.
        reaching = sorted((test for test, lines in per_test.items() if lines & span), key=lambda k: seconds.get(k, 0.0))
        if not reaching:
            m.status = "not covered"
            log(f"  not covered #{m.index} line {m.line}: {m.change}   | {m.source_line}")
            continue
        # A mutant in code run at import (a default, a table) may change any test: run them all.
        jobs.append((m, tests if "<import>" in reaching else reaching))

    def run(job: tuple[Mutant, list[str]]) -> Mutant:
        m, selected = job
        outcome, _seconds = run_once(name, path, mutated_source(source, m.index), selected, timeout)
        m.status = {"failed": "killed", "timeout": "timeout", "passed": "survived"}[outcome]
        return m

    with ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        for done, m in enumerate(pool.map(run, jobs), 1):
            if m.status == "survived":
                log(f"  survived #{m.index} line {m.line}: {m.change}   | {m.source_line}")
            if done % 25 == 0:
                log(f"  {done}/{len(jobs)} run, {time.monotonic() - start:.0f} s")
    counted = [m for m in mutants if m.status != "skipped"]
    killed = sum(m.status in ("killed", "timeout") for m in counted)
    rate = killed / len(counted) if counted else 1.0
    wall = time.monotonic() - start
    log(f"{module}: killed {killed}/{len(counted)} = {100 * rate:.1f}% in {wall:.0f} s")
    return {"module": module, "tests": tests, "mutants": len(counted), "killed": killed, "kill_rate": rate,
            "wall_s": round(wall, 1), "baseline_s": round(base, 1),
            "survivors": [asdict(m) for m in counted if m.status in ("survived", "not covered")]}


def _imports_of(path: Path, module: str) -> set[str]:
    """The dpokit modules `module` (at `path`) imports, statically (absolute and relative forms)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in out if name == "dpokit" or name.startswith("dpokit.")}


def _package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def dependents(target: str) -> set[str]:
    """`target` and every dpokit module that imports it, directly or through others (a package
    counts as importing its submodules' importers too, as `from dpokit.x import y` runs dpokit.x)."""
    modules = _package_modules()
    graph = {name: _imports_of(path, name) for name, path in modules.items()}
    stale, grew = {target}, True
    while grew:
        grew = False
        for name, imported in graph.items():
            if name not in stale and imported & stale:
                stale.add(name)
                grew = True
    return stale


def _preimport() -> None:
    """What every child needs, imported once in the parent: the test tools, torch, transformers and
    every dpokit module (the child drops the mutated one and its importers). No tensor op runs here."""
    import importlib

    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with contextlib.suppress(ImportError):
        import hypothesis  # noqa: F401
    for name in _package_modules():
        if name.endswith("__main__"):
            continue
        with contextlib.suppress(Exception):  # an optional dependency missing: the child tries again
            importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", type=int, nargs="+", help="run only these mutant indices")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    if args.list:
        for module in modules:
            for m in list_mutants((SRC / f"{module}.py").read_text()):
                print(f"{module} #{m.index} line {m.line}: {m.change}   | {m.source_line}")
        return 0
    _preimport()
    results = [run_module(module, MODULES[module], set(args.only) if args.only else None, args.jobs) for module in modules]
    print("\nmodule            killed / mutants   kill rate   wall s")
    for r in results:
        print(f"{r['module']:<17} {r['killed']:>6} / {r['mutants']:<7}  {100 * r['kill_rate']:>8.1f}%  {r['wall_s']:>7.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
