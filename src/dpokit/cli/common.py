"""Shared pieces of the command line: one-line argparse errors and options built from config fields."""

from __future__ import annotations

import argparse
import dataclasses

from dpokit.config import build_config, coerce, flag_of, format_value, iter_options, kind_of, load_yaml
from dpokit.io import shows_progress
from dpokit.paths import check_outputs_apart


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on a subcommand: a full traceback instead of the one-line error."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def show_progress(args: argparse.Namespace) -> bool:
    """--progress on/off/auto: progress bars, with auto meaning when stderr is a terminal."""
    return shows_progress(getattr(args, "progress", "auto"))


def add_field(group, f: dataclasses.Field, help_override: str | None = None) -> None:
    """One option from one config field: flag from the name (or `flag` metadata), help and default."""
    flag = flag_of(f)
    help_text = help_override or f.metadata["help"]
    if "default" not in help_text:
        help_text += f" (default: {format_value(f.default)})"
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
                 helps: dict[str, str] | None = None) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if not only or f.name in only:
            add_field(group, f, (helps or {}).get(f.name))


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
