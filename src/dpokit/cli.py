"""Command line: `dpokit train`, `dpokit demo`, `dpokit data inspect`. Thin: parse, build the config, call the library.

Every option of `train` is generated from the config dataclasses, so `--help`, YAML files and
the code share one list of names, defaults and help texts.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from dpokit.config import build_config, coerce, iter_options, load_yaml
from dpokit.errors import DpokitError, TrainingInterrupted


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags given here override it")
    groups = {}
    for section, f in iter_options():
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        _add_field_option(group, f)


def _add_field_option(group, f) -> None:
    """One `--flag-name` for a config field, with its help text and default."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f"{f.metadata['help']} (default: {f.default})"
    if str(f.type) == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        return
    group.add_argument(
        flag,
        default=argparse.SUPPRESS,
        choices=f.metadata.get("choices"),
        metavar=f.name.upper() if not f.metadata.get("choices") else None,
        help=help_text,
    )


def config_from_args(args: argparse.Namespace):
    """Defaults < YAML (--config) < flags given on the command line."""
    layers = []
    if getattr(args, "config", None):
        layers.append(load_yaml(args.config))
    flags: dict[str, dict] = {}
    for section, f in iter_options():
        if hasattr(args, f.name):
            flag = "--" + f.name.replace("_", "-")
            flags.setdefault(section, {})[f.name] = coerce(getattr(args, f.name), f, flag)
    layers.append(flags)
    return build_config(*layers)


def _cmd_train(args: argparse.Namespace) -> int:
    from dpokit.train.loop import train

    train(config_from_args(args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dpokit.demo.toy import run_demo

    run_demo(output=args.output, steps=args.steps, overwrite=True)
    return 0


_INSPECT_SKIPS = ("data", "eval_data")


def _add_data_command(sub) -> None:
    data = sub.add_parser("data", help="inspect preference data (the data doctor)",
                          description="Tools for preference data.")
    data.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser, required=True)
    inspect = data_sub.add_parser(
        "inspect", help="report rows kept and skipped, lengths, truncation, duplicates, ties and length bias",
        description="Read PATH exactly as `dpokit train` would and report on it. With --model, lengths are tokens "
        "and truncation is estimated; without it, lengths are characters. Exits 1 when no row is usable.")
    inspect.add_argument("path", metavar="PATH", help="any source --data accepts")
    inspect.add_argument("--model", help="model folder or hub id whose tokenizer (and chat template) to use")
    inspect.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own Python code")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.add_argument("--plot", metavar="FILE.png", help="also write length histograms to this PNG")
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    group = inspect.add_argument_group("data options (as for train)")
    for section, f in iter_options():
        if section == "data" and f.name not in _INSPECT_SKIPS:
            _add_field_option(group, f)
    inspect.set_defaults(func=_cmd_data_inspect)


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from dpokit.config import DataConfig, validate_data
    from dpokit.data.inspect import format_report, inspect_data, report_json

    data = DataConfig()
    for section, f in iter_options():
        if section == "data" and hasattr(args, f.name) and f.name not in _INSPECT_SKIPS:
            setattr(data, f.name, coerce(getattr(args, f.name), f, "--" + f.name.replace("_", "-")))
    validate_data(data)
    tokenizer = None
    if args.model:
        from dpokit.models import load_tokenizer

        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    report = inspect_data(args.path, data, tokenizer, plot=args.plot)
    print(report_json(report) if args.json else format_report(report))
    return 0 if report["rows_kept"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpokit", description="Direct Preference Optimization for Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train a policy with DPO on preference pairs",
                           description="Train a causal LM with DPO. Required: --model, --data, --output.")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    _add_train_options(train)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="offline demo: DPO on a tiny built-in model and task",
                          description="Build a tiny model and a learnable preference task, train DPO on it, "
                          "and print the reward accuracy as it rises. Needs no download.")
    demo.add_argument("--output", default="demo-output", help="folder for the demo's files (default: demo-output)")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    demo.set_defaults(func=_cmd_demo)
    _add_data_command(sub)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are the output; silence the libraries' bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"dpokit: {exc}", file=sys.stderr)
        return exc.exit_code
    except DpokitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dpokit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a one-line message
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"dpokit: internal error: {type(exc).__name__}: {first} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
