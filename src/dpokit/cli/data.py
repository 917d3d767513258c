"""`dpokit data inspect`: the data doctor from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

from dpokit.cli.common import Parser, add_debug_flag, add_field
from dpokit.config import DataConfig, build_config, coerce, flag_of, iter_options, validate_data
from dpokit.data.doctor import format_report, inspect_data, report_json
from dpokit.errors import DpokitError
from dpokit.model.load import load_model_config, load_tokenizer
from dpokit.paths import check_creatable, check_outputs_apart
from dpokit.settings_checks import fit_max_length
from dpokit.train.memory_budget import plan_line

_INSPECT_SKIPS = ("data", "eval_data")
# With --memory-budget, what the plan depends on besides the data (as train reads them).
_PLAN_OPTIONS = ("memory_budget", "batch_size", "gradient_accumulation_steps", "dtype", "device", "loss", "lora_r",
                 "reference", "gradient_checkpointing", "selective_recompute", "activation_offload",
                 "malloc_mmap_threshold")


def add_data_command(sub) -> None:
    data = sub.add_parser("data", help="inspect preference data (the data doctor)",
                          description="Tools for preference data.")
    add_debug_flag(data)
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=Parser, required=True)
    inspect = data_sub.add_parser(
        "inspect", help="report rows kept and skipped, lengths, truncation, duplicates, ties and length bias",
        description="Read PATH exactly as `dpokit train` would and report on it. With --model, lengths are tokens "
        "and truncation is estimated; without it, lengths are characters. Exits 1 when no row is usable.")
    inspect.add_argument("path", metavar="PATH", help="any source --data accepts")
    inspect.add_argument("--model", help="model folder or hub id whose tokenizer (and chat template) to use")
    inspect.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own Python code")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.add_argument("--plot", metavar="FILE.png", help="also write length histograms to this PNG")
    add_debug_flag(inspect)
    group = inspect.add_argument_group("data options (as for train)")
    for section, f in iter_options():
        if section == "data" and f.name not in _INSPECT_SKIPS:
            add_field(group, f)
    plan = inspect.add_argument_group("memory plan (with --model and --memory-budget: the plan train would follow, "
                                      "probed, printed after the report; nothing is trained)")
    for _section, f in iter_options():
        if f.name in _PLAN_OPTIONS:
            add_field(plan, f)
    inspect.set_defaults(func=_cmd_data_inspect)


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    data = DataConfig()
    for section, f in iter_options():
        if section == "data" and hasattr(args, f.name) and f.name not in _INSPECT_SKIPS:
            setattr(data, f.name, coerce(getattr(args, f.name), f, flag_of(f)))
    validate_data(data)
    if args.plot:
        check_outputs_apart([("--plot", args.plot)], [("PATH", args.path), ("--model", args.model),
                                                     ("--chat-template", data.chat_template)])
        check_creatable(args.plot, "--plot", folder=False)
    tokenizer = None
    if args.model:
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        # As train does: a --max-length past the model's positions is capped (the line goes to stderr).
        data.max_length = fit_max_length(data.max_length, data.max_prompt_length,
                                         load_model_config(args.model, args.trust_remote_code), tokenizer,
                                         lambda line: print(line, file=sys.stderr))
    if getattr(args, "memory_budget", None) and not args.model:
        raise DpokitError("--memory-budget needs --model (the plan probes a training step of that model)")
    report = inspect_data(args.path, data, tokenizer, plot=args.plot)
    print(report_json(report) if args.json else format_report(report))
    if report["rows_kept"] and getattr(args, "memory_budget", None):
        print(_memory_plan_line(args, data))
    return 0 if report["rows_kept"] else 1


def _memory_plan_line(args: argparse.Namespace, data: DataConfig) -> str:
    """The plan `dpokit train` would make for this data and model (the run's settings from the flags)."""
    layers: dict[str, dict] = {"model": {"model": args.model, "trust_remote_code": args.trust_remote_code},
                               "data": {**dataclasses.asdict(data), "data": args.path}}
    for section, f in iter_options():
        if f.name in _PLAN_OPTIONS and hasattr(args, f.name):
            layers.setdefault(section, {})[f.name] = coerce(getattr(args, f.name), f, flag_of(f))
    with tempfile.TemporaryDirectory(prefix="dpokit-plan-") as scratch:
        layers.setdefault("train", {})["output"] = scratch  # required by the config, never written
        return plan_line(build_config(layers), log=lambda line: print(line, file=sys.stderr))
