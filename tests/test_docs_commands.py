"""Every command the README and docs/*.md show parses with the real CLI parser, and every option
they name exists (issue 30). Nothing trains: a command in a code block goes through
`dpokit.cli.build_parser()` (an unknown option, a bad choice or a missing positional fails as it
would for a user) and each option's value through the config's own conversion (`coerce`: a
`--learning-rate abc` fails); torchrun lines through torch's own torchrun parser; `make TARGET`
against the Makefile. An option in a prose code span must exist on the subcommand the span names,
else on some subcommand (or on the benchmark script the span names). `dpokit --version` and
`dpokit COMMAND --help`, where the docs show them, run for real."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit import config as dpokit_config
from dpokit.cli import build_parser
from dpokit.config import coerce, flag_of
from dpokit.errors import DpokitError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\s*$")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
DPOKIT_HEADS = ("dpokit", ".venv/bin/dpokit")
TORCHRUN_HEADS = ("torchrun", ".venv/bin/torchrun", "dpokit-torchrun", ".venv/bin/dpokit-torchrun")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
PLACEHOLDERS = ("...", "…")
# Options the docs name on purpose as what a user might mistype: they must stay unknown, and the
# CLI must point to the right one.
MISTYPED = {"--max-step": "--max-steps", "--lr": "--learning-rate"}


@dataclasses.dataclass(frozen=True)
class Shown:
    """One command line (or a prose code span) as a doc shows it: `where` is FILE:LINE."""

    where: str
    text: str


def _blocks_and_prose(path: Path) -> tuple[list[Shown], list[Shown]]:
    """Shell code-block lines (continuations joined, comments dropped) and the rest of the file."""
    commands, prose, fence, pending, start = [], [], None, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.relative_to(ROOT)}:{number}"
        marker = FENCE.match(line.strip())
        if marker:
            fence = marker.group(1) if fence is None else None
            continue
        if fence is None:
            prose.append(Shown(where, line))
        elif fence in SHELL_BLOCKS:
            start = start if pending else number
            joined = pending + " " + line.strip() if pending else line.strip()
            pending = joined[:-1] if joined.endswith("\\") else ""
            if not pending and joined:
                commands.append(Shown(f"{path.relative_to(ROOT)}:{start}", joined))
    return commands, prose


def _words(text: str) -> list[str]:
    """Shell words up to the first pipe or `;`/`&&`, comments dropped; `[--json]` read as `--json`."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="|;&")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line a shell would run
        return ["<unbalanced quotes>"] if text.split()[0] in (*DPOKIT_HEADS, *TORCHRUN_HEADS, "make") else []
    for word in tokens:
        if word in ("|", ";", "&&", "||", "&"):
            break
        word = word.strip("[]")
        if word and word not in PLACEHOLDERS:
            words.append(word)
    return words


def _dpokit_args(words: list[str]) -> list[str] | None:
    """The arguments after `dpokit` / `python -m dpokit`, or None when the line runs something else."""
    if words and words[0] in DPOKIT_HEADS:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "dpokit":
            return words[i + 2:]
    return None


def _all_commands() -> list[Shown]:
    return [c for path in DOCS for c in _blocks_and_prose(path)[0]]


def _prose_spans() -> list[Shown]:
    spans = []
    for path in DOCS:
        for line in _blocks_and_prose(path)[1]:
            spans += [Shown(line.where, s) for s in re.findall(r"`([^`]+)`", line.text)]
    return spans


# ---- the real parsers -------------------------------------------------------------------------

def _fields_by_dest() -> dict[str, dataclasses.Field]:
    classes = [getattr(dpokit_config, name) for name in dpokit_config.__all__]
    return {f.name: f for cls in classes if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_parser(args: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """The innermost subcommand parser `args` names (`data inspect`), and its name."""
    parser, names = build_parser(), []
    for word in args:
        chosen = _subparsers(parser).get(word)
        if chosen is None:
            break
        parser, names = chosen, [*names, word]
    return parser, " ".join(names)


def _every_option() -> set[str]:
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        found.update(s for s in parser._option_string_actions if s.startswith("--"))
        for sub in _subparsers(parser).values():
            walk(sub)

    walk(build_parser())
    return found


def _parse_dpokit(args: list[str]) -> str | None:
    """None when `dpokit ARGS` parses and every value converts; else the one-line error."""
    if "--help" in args or "-h" in args or "--version" in args:
        parser, _ = _command_parser(args)
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in
                   parser._option_string_actions]
        return f"unknown options {unknown}" if unknown else None
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            namespace = build_parser().parse_args(args)
    except SystemExit:
        return stderr.getvalue().strip() or "argparse exited"
    fields = _fields_by_dest()
    for dest, value in vars(namespace).items():
        f = fields.get(dest)
        if f is None or value is None or isinstance(value, bool) or "help" not in f.metadata:
            continue
        for item in value if isinstance(value, list) else [value]:  # sweep's --loss is given once per loss
            try:
                coerce(item, f, flag_of(f))
            except DpokitError as exc:
                return str(exc)
    return None


def _parse_torchrun(words: list[str]) -> str | None:
    from torch.distributed.run import get_args_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            launch = get_args_parser().parse_args(words[1:])
    except SystemExit:
        return "torchrun: " + stderr.getvalue().strip()
    if launch.module and launch.training_script == "dpokit":
        return _parse_dpokit(list(launch.training_script_args))
    return f"torchrun runs {launch.training_script!r}, not dpokit"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


def _check(command: Shown) -> str | None:
    """None when the command is not one of ours or it is right; else what is wrong with it."""
    words = _words(command.text)
    if not words:
        return None
    if words == ["<unbalanced quotes>"]:
        return "unbalanced quotes"
    if words[0] == "make":
        missing = [t for t in words[1:] if "=" not in t and t not in _make_targets()]
        return f"no Makefile target {missing}" if missing else None
    if words[0] in TORCHRUN_HEADS:
        return _parse_torchrun(words)
    args = _dpokit_args(words)
    return None if args is None else _parse_dpokit(args)


# ---- the tests ---------------------------------------------------------------------------------

def test_the_docs_show_commands_to_check():
    commands = _all_commands()
    shown = [c for c in commands if _dpokit_args(_words(c.text)) is not None]
    assert len(shown) >= 10, [c.text for c in commands]
    assert any(_words(c.text)[:2] == ["make", "demo"] for c in commands)
    assert any(_words(c.text)[0] in TORCHRUN_HEADS for c in commands if _words(c.text))


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: c.where)
def test_every_command_shown_parses(command):
    problem = _check(command)
    assert problem is None, f"{command.where}: {command.text}\n  -> {problem}"


def test_every_option_named_in_prose_exists():
    known, wrong = _every_option(), []
    torchrun = {s for a in _torchrun_actions() for s in a.option_strings}
    for span in _prose_spans():
        words = _words(span.text)
        args = _dpokit_args(words)
        scope = _command_parser(args)[0]._option_string_actions if args else None
        script = next((ROOT / w for w in words + [span.text] if re.match(r"^benchmarks/\w+\.py$", w)), None)
        for option in OPTION.findall(span.text):
            if script is not None and script.is_file():
                ok = option in script.read_text(encoding="utf-8")
            elif words and words[0] in TORCHRUN_HEADS:
                ok = option in torchrun or option in known
            elif scope is not None:
                ok = option in scope
            else:
                ok = option in known or option in torchrun
            if option in MISTYPED:
                ok = option not in known
            if not ok:
                wrong.append(f"{span.where}: `{span.text}` names {option}")
    assert not wrong, "\n".join(wrong)


def test_the_mistyped_options_the_docs_show_get_the_right_name(capsys):
    for typed, meant in MISTYPED.items():
        problem = _parse_dpokit(["train", typed, "1"])
        assert problem and "did you mean" in problem and meant in problem, problem


def _yaml_blocks() -> list[Shown]:
    blocks = []
    for path in DOCS:
        text, fence, start, lines = path.read_text(encoding="utf-8").splitlines(), None, 0, []
        for number, line in enumerate(text, 1):
            marker = FENCE.match(line.strip())
            if marker and fence is None:
                fence, start, lines = marker.group(1), number, []
            elif marker:
                if fence in ("yaml", "yml"):
                    blocks.append(Shown(f"{path.relative_to(ROOT)}:{start}", "\n".join(lines)))
                fence = None
            elif fence is not None:
                lines.append(line)
    return blocks


def test_every_config_file_shown_loads(tmp_path):
    """A YAML config in the docs loads as `--config` reads it (an unknown key names its line) and
    builds a run's config (its option values convert)."""
    from dpokit.config import build_config, load_yaml

    blocks = _yaml_blocks()
    assert blocks
    for block in blocks:
        path = tmp_path / "run.yaml"
        path.write_text(block.text, encoding="utf-8")
        try:
            build_config(load_yaml(path), {"train": {"output": str(tmp_path / "out")}})
        except DpokitError as exc:
            raise AssertionError(f"{block.where}: {exc}") from None


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().replace("`", "").lower())
    return text.replace(" ", "-")


def test_every_link_between_the_docs_reaches_a_file_and_heading():
    wrong = []
    for path in DOCS:
        for line in _blocks_and_prose(path)[1]:
            for target in re.findall(r"\]\(([^)\s]+)\)", line.text):
                if re.match(r"^[a-z]+:", target):
                    continue  # a web address
                name, _, anchor = target.partition("#")
                file = (path.parent / name).resolve() if name else path
                if not file.exists():
                    wrong.append(f"{line.where}: {target} (no such file)")
                elif anchor and file.suffix == ".md":
                    headings = [_anchor(h) for h in re.findall(r"^#+ .*$", file.read_text(encoding="utf-8"), re.M)]
                    if anchor not in headings:
                        wrong.append(f"{line.where}: {target} (no such heading)")
    assert not wrong, "\n".join(wrong)


def _torchrun_actions():
    from torch.distributed.run import get_args_parser

    return get_args_parser()._actions


def test_a_made_up_option_is_caught():
    """The checks above can fail: an invented option, a bad value, a wrong subcommand."""
    assert _check(Shown("x", "dpokit train --model m --data d --output o --learning-rat 1e-6"))
    assert _check(Shown("x", "dpokit train --model m --learning-rate fast"))
    assert _check(Shown("x", "dpokit sample --model m --prompt hi --beta 0.1"))
    assert _check(Shown("x", "torchrun --nproc-per-node 2 -m dpokit train --lr 1e-3"))
    assert _check(Shown("x", "make deploy"))
    assert _check(Shown("x", "dpokit train --model m --data d --output o  # a comment --nothing")) is None
    assert OPTION.findall("`--no-such-option`") and "--no-such-option" not in _every_option()


def _shown_runs() -> list[list[str]]:
    """`dpokit --version` and `dpokit CMD --help` as the docs show them (in blocks or prose)."""
    texts = [c.text for c in _all_commands()] + [s.text for s in _prose_spans()]
    runs = []
    for text in texts:
        args = _dpokit_args(_words(text))
        if args and (args == ["--version"] or (args[-1] == "--help" and len(args) <= 3)) and args not in runs:
            runs.append(args)
    return runs


def test_version_and_help_shown_in_the_docs_run():
    runs = _shown_runs()
    assert ["--version"] in runs and any(r[-1] == "--help" for r in runs), runs
    for args in runs:
        proc = subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert ("dpokit " if args == ["--version"] else "usage: dpokit") in proc.stdout, (args, proc.stdout[:300])
