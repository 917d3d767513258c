"""Shared pieces of the command line: one-line argparse errors and options built from config fields."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from collections.abc import Collection

from dpokit.config import build_config, coerce, flag_of, format_value, iter_options, kind_of, load_yaml
from dpokit.io import shows_progress
from dpokit.paths import check_outputs_apart


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), pointing at --help. Options are never
    abbreviated (argparse's prefix matching took `--lr` for `--lr-scheduler` and `--max-step` for
    `--max-steps` silently): an unknown option is an error from the subcommand it was given to,
    naming the nearest options."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = _chosen_parser(self, namespace)
            option = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
            if option is None:
                owner.error(f"unrecognized arguments: {' '.join(extras)}")
            owner.error(f"unrecognized option {option}{_suggestion(option, owner)}")
        return namespace


def _chosen_parser(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser the arguments chose (`dpokit data inspect`), else `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
            if chosen is not None:
                return _chosen_parser(chosen, namespace)
    return parser


def _suggestion(option: str, parser: argparse.ArgumentParser) -> str:
    """'; did you mean --x?' for the options of `parser` nearest `option`: those it abbreviates,
    word by word (`--max-step`, `--grad-accum`) or by initials (`--lr`), else the closest spellings."""
    known = sorted(s for s in parser._option_string_actions if s.startswith("--") and s != "--help")
    typed = option.lstrip("-").replace("_", "-").lower().split("-")
    near = [s for s in known if _abbreviates(typed, s[2:].split("-"))] or difflib.get_close_matches(
        "--" + "-".join(typed), known, n=3, cutoff=0.75)
    if not near:
        return ""
    return f"; did you mean {near[0]}?" if len(near) == 1 else f"; did you mean one of {', '.join(near[:4])}?"


def _abbreviates(typed: list[str], words: list[str]) -> bool:
    initials = len(typed) == 1 and len(typed[0]) > 1 and typed[0] == "".join(w[0] for w in words)
    return initials or (len(typed) <= len(words) and all(w.startswith(t) for t, w in zip(typed, words, strict=False)))


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on a subcommand: a full traceback instead of the one-line error."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def show_progress(args: argparse.Namespace) -> bool:
    """--progress on/off/auto: progress bars, with auto meaning when stderr is a terminal."""
    return shows_progress(getattr(args, "progress", "auto"))


def add_field(group, f: dataclasses.Field, help_override: str | None = None, inherited: bool = False) -> None:
    """One option from one config field: flag from the name (or `flag` metadata), help and default
    (`inherited`: a dpokit run's own setting comes first, as `evaluate` reads it)."""
    flag = flag_of(f)
    help_text = help_override or f.metadata["help"]
    if "default" not in help_text:
        help_text += f" (default: {format_value(f.default)})"
    if inherited:  # "(default 0.1)" -> "(default: the run's own, else 0.1)"
        help_text = re.sub(r"\bdefault:? ", "default: the run's own, else ", help_text, count=1)
    if kind_of(f).base is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        return
    group.add_argument(
        flag,
        dest=f.name,
        default=argparse.SUPPRESS,
        choices=f.metadata.get("choices"),
        metavar=flag[2:].upper().replace("-", "_") if not f.metadata.get("choices") else None,
        help=help_text,
    )


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags given here override it")
    groups = {}
    for section, f in iter_options():
        if f.name not in skip:
            add_field(groups.setdefault(section, parser.add_argument_group(f"{section} options")), f)


def add_section(parser: argparse.ArgumentParser, title: str, cls: type, only: tuple[str, ...] = (),
                 helps: dict[str, str] | None = None, inherited: Collection[str] = ()) -> None:
    """The options of `cls` (`only` these) in one help group; `inherited` name those whose default
    is a dpokit run's own setting."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if not only or f.name in only:
            add_field(group, f, (helps or {}).get(f.name), inherited=f.name in inherited)


def section_from_args(args: argparse.Namespace, cls: type, only: tuple[str, ...] = ()) -> dict:
    """{field: value} for the options of `cls` given on the command line, coerced and checked."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and (not only or f.name in only):
            values[f.name] = coerce(getattr(args, f.name), f, flag_of(f))
    return values


def config_from_args(args: argparse.Namespace, *fixed_layers: dict):
    """Defaults < `fixed_layers` (set by the command itself) < YAML (--config) < flags given."""
    layers = list(fixed_layers)
    if getattr(args, "config", None):
        layers.append(load_yaml(args.config))
    flags: dict[str, dict] = {}
    for section, f in iter_options():
        if hasattr(args, f.name):
            flags.setdefault(section, {})[f.name] = coerce(getattr(args, f.name), f, flag_of(f))
    layers.append(flags)
    return build_config(*layers)


def check_config_apart(args: argparse.Namespace, output: str | None) -> None:
    """--config is an input like any other: the command's --output must not be, hold or lie in it."""
    check_outputs_apart([("--output", output)], [("--config", getattr(args, "config", None))])
