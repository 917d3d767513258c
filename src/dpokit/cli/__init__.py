"""Command line: `dpokit train`, `demo`, `online`, `data inspect`, `sample`, `evaluate`, `sweep`, `report`,
`runs`, `export`.

Thin: parse, build the config, call the library. Every option of `train` is generated from the
config dataclasses, so `--help`, YAML files and the code share one list of names, defaults and
help texts. Each group of subcommands lives in its own module and registers itself here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from functools import partial

from dpokit import __version__
from dpokit.cli.common import Parser, add_debug_flag, add_train_options, check_config_apart, config_from_args
from dpokit.cli.data import add_data_command
from dpokit.cli.demo import add_demo_command, add_online_command
from dpokit.cli.evaluation import (
    add_evaluate_command,
    add_report_command,
    add_sample_command,
    add_sweep_command,
)
from dpokit.cli.runs import add_runs_command
from dpokit.config import DTYPES
from dpokit.errors import DpokitError, TrainingInterrupted, first_line
from dpokit.eval.report import report_after_training
from dpokit.io import console, silence_stdout
from dpokit.model.export import export_model
from dpokit.train.loop import train

__all__ = ["build_parser", "config_from_args", "main"]

_TRAINING_COMMANDS = ("train", "online", "sweep", "demo")


def _cmd_train(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    check_config_apart(args, cfg.train.output)
    # Each line flushed, so a reader gone early (`| head`) shows at once: train goes on, into train.log only.
    result = train(cfg, log=partial(print, flush=True))
    if result.is_main:  # under torchrun, rank 0 writes the report
        report_after_training(result.output, console, result.trackers)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:

    out = export_model(args.run, args.output, merge=args.merge, base=args.base, dtype=args.dtype,
                       overwrite=args.overwrite)
    print(f"dpokit: wrote {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_export_command(sub) -> None:
    export = sub.add_parser("export", help="write a trained run as a standalone Hugging Face model",
                            description="Write a run folder as a standalone model + tokenizer. For a LoRA "
                            "run, --merge folds the adapter into the base model's weights. A .gguf model file is "
                            "written dequantized, as a plain model folder.")
    export.add_argument("run", help="the run folder (dpokit train --output), or a .gguf model file")
    export.add_argument("--output", required=True, help="folder for the exported model")
    export.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base weights")
    export.add_argument("--base", help="base model of a LoRA run (default: the run's --model)")
    export.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="precision of the written weights (default: fp32)")
    export.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    add_debug_flag(export)
    export.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dpokit", description="Direct Preference Optimization for Hugging Face causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    train = sub.add_parser("train", help="train a policy with DPO on preference pairs",
                           description="Train a causal LM with DPO. Required: --model, --data, --output.")
    add_debug_flag(train)
    add_train_options(train)
    train.set_defaults(func=_cmd_train)

    add_demo_command(sub)
    add_online_command(sub)
    add_data_command(sub)
    add_sample_command(sub)
    add_evaluate_command(sub)
    add_sweep_command(sub)
    add_report_command(sub)
    add_runs_command(sub)
    _add_export_command(sub)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bar and log lines are the output; silence the libraries' bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # peft still calls transformers' renamed gradient-checkpointing helpers; nothing for users to do.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def _closed_pipe(command: str) -> int:
    """The reader of our output went away (`dpokit data inspect ... | head`): a normal, quiet end.
    stdout is pointed at /dev/null so the interpreter's final flush does not fail a second time.
    Training commands log through `console`, which a closed stdout does not stop: one that ends
    here lost its stderr too (a progress bar into `2>&1 | head`), and stopped unsaved: no success."""
    silence_stdout()
    return 128 + signal.SIGPIPE if command in _TRAINING_COMMANDS else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, in the handler below, not at exit
        return code
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # every torchrun process stops; rank 0 says how to resume
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
    except BrokenPipeError:
        return _closed_pipe(args.command)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a one-line message
        if args.debug:
            raise
        first = first_line(exc) if str(exc).strip() else ""
        print(f"dpokit: internal error: {type(exc).__name__}: {first} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1
