"""Command line: `dpokit train`, `sample`, `evaluate`, `sweep`, `report`, `demo`. Thin: parse, build the
config, call the library.

Every option of `train` is generated from the config dataclasses, so `--help`, YAML files and
the code share one list of names, defaults and help texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Sequence

from dpokit.config import (
    DataConfig,
    EvaluateCommandConfig,
    JudgeConfig,
    LossConfig,
    ModelConfig,
    SampleCommandConfig,
    SamplingConfig,
    SweepConfig,
    TrainConfig,
    build_config,
    coerce,
    iter_options,
    load_yaml,
    parse_number_list,
    validate_sampling,
)
from dpokit.errors import DpokitError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_field(group, f: dataclasses.Field, help_override: str | None = None) -> None:
    """One option from one config field: flag from the name (or `flag` metadata), help and default."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    help_text = help_override or f.metadata["help"]
    if "default" not in help_text:
        help_text += f" (default: {f.default})"
    if str(f.type) == "bool":
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


def _add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags given here override it")
    groups = {}
    for section, f in iter_options():
        if f.name not in skip:
            _add_field(groups.setdefault(section, parser.add_argument_group(f"{section} options")), f)


def _add_section(parser: argparse.ArgumentParser, title: str, cls: type, only: tuple[str, ...] = (),
                 helps: dict[str, str] | None = None) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if not only or f.name in only:
            _add_field(group, f, (helps or {}).get(f.name))


def _section_from_args(args: argparse.Namespace, cls: type, only: tuple[str, ...] = ()) -> dict:
    """{field: value} for the options of `cls` given on the command line, coerced and checked."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name) and (not only or f.name in only):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            values[f.name] = coerce(getattr(args, f.name), f, flag)
    return values


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


def _show_progress(args: argparse.Namespace) -> bool:
    choice = getattr(args, "progress", "auto")
    return choice == "on" or (choice == "auto" and sys.stderr.isatty())


def _model_options(args: argparse.Namespace) -> ModelConfig:
    model = ModelConfig(**_section_from_args(args, ModelConfig))
    if not model.model:
        raise DpokitError("missing required option: --model")
    return model


def _sampling_options(args: argparse.Namespace) -> SamplingConfig:
    sampling = SamplingConfig(**_section_from_args(args, SamplingConfig))
    validate_sampling(sampling)
    return sampling


def _add_model_and_sampling(parser: argparse.ArgumentParser, model_help: str) -> None:
    _add_section(parser, "model options", ModelConfig, helps={"model": model_help})
    _add_section(parser, "sampling options", SamplingConfig)
    _add_section(parser, "output options", TrainConfig, only=("progress",))
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def _cmd_sample(args: argparse.Namespace) -> int:
    from dpokit.sampling import check_prompt, read_prompts, run_sample

    model, sampling = _model_options(args), _sampling_options(args)
    command = SampleCommandConfig(**_section_from_args(args, SampleCommandConfig))
    judging = JudgeConfig(**_section_from_args(args, JudgeConfig, only=("prompts", "max_prompts")))
    if bool(command.prompt) == bool(judging.prompts):
        raise DpokitError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
    prompts = [check_prompt(command.prompt, "--prompt")] if command.prompt else read_prompts(
        judging.prompts, judging.max_prompts)
    run_sample(model.model, prompts, sampling, tokenizer=model.tokenizer, device=model.device, dtype=model.dtype,
               trust_remote_code=model.trust_remote_code, output=command.samples_output,
               progress=_show_progress(args))
    return 0


def _add_sample_command(sub) -> None:
    parser = sub.add_parser("sample", help="sample completions from a model",
                            description="Sample completions (KV cache, batched, seeded; chat template for "
                            "message prompts; stops at EOS). Greedy with --temperature 0.")
    _add_section(parser, "prompt and output options", SampleCommandConfig)
    _add_section(parser, "prompt file options", JudgeConfig, only=("prompts", "max_prompts"))
    parser.add_argument("--seed", dest="sample_seed", default=argparse.SUPPRESS, metavar="SEED",
                        help="same as --sample-seed")
    _add_model_and_sampling(parser, "the model to sample from: a model folder or hub id (required)")
    parser.set_defaults(func=_cmd_sample)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dpokit.evaluate import evaluate_models, format_table
    from dpokit.io import atomic_write_text

    model, sampling = _model_options(args), _sampling_options(args)
    command = EvaluateCommandConfig(**_section_from_args(args, EvaluateCommandConfig))
    data = DataConfig(**_section_from_args(args, DataConfig, only=("data", "max_length", "max_prompt_length")))
    judging = JudgeConfig(**_section_from_args(args, JudgeConfig))
    batch = _section_from_args(args, TrainConfig, only=("batch_size",)).get("batch_size", 8)
    # --json keeps stdout for the JSON object alone; progress lines go to stderr.
    log = (lambda line: print(line, file=sys.stderr)) if command.json_output else print
    result = evaluate_models(
        model.model, command.reference, tokenizer=model.tokenizer, device=model.device, dtype=model.dtype,
        trust_remote_code=model.trust_remote_code, data=data.data,
        loss_overrides=_section_from_args(args, LossConfig), max_length=data.max_length,
        max_prompt_length=data.max_prompt_length, batch_size=batch, prompts=judging.prompts,
        max_prompts=judging.max_prompts, judge=judging.judge, judge_batch_size=judging.judge_batch_size,
        sampling=sampling, progress=_show_progress(args), log=log)
    if command.evaluation_output:
        atomic_write_text(command.evaluation_output, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if command.json_output else format_table(result))
    return 0


def _add_evaluate_command(sub) -> None:
    parser = sub.add_parser("evaluate", help="preference accuracy, judged reward, win rate and KL of a policy",
                            description="Compare a policy with its reference: implicit-reward figures on "
                            "preference pairs (--data), and on prompts (--prompts) the judged reward of each, "
                            "the win rate (--judge) and KL(policy || reference) from policy samples.")
    _add_section(parser, "evaluation options", EvaluateCommandConfig)
    _add_section(parser, "preference data options", DataConfig, only=("data", "max_length", "max_prompt_length"),
                 helps={"data": "preference pairs to compute reward accuracy and margins on"})
    _add_section(parser, "implicit reward options (default: the run's own)", LossConfig)
    _add_section(parser, "batch options", TrainConfig, only=("batch_size",))
    _add_section(parser, "prompt and judge options", JudgeConfig)
    _add_model_and_sampling(parser, "the policy to evaluate: a model folder (a dpokit run) or hub id (required)")
    parser.set_defaults(func=_cmd_evaluate)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from dpokit.sweep import run_sweep

    sweep = SweepConfig(**_section_from_args(args, SweepConfig))
    betas = parse_number_list(sweep.betas, "--beta")
    losses = [name.strip() for name in sweep.losses.split(",") if name.strip()]
    base = config_from_args(args)
    run_sweep(base, betas, losses, JudgeConfig(**_section_from_args(args, JudgeConfig)), _sampling_options(args))
    return 0


def _add_sweep_command(sub) -> None:
    parser = sub.add_parser("sweep", help="train per β (and loss), evaluate each, draw the reward-KL frontier",
                            description="Train once per β (and per --loss), evaluate each run on --prompts with "
                            "--judge, and write frontier.png and frontier.csv (judged reward vs KL) in --output.")
    _add_section(parser, "sweep options", SweepConfig)
    _add_section(parser, "prompt and judge options", JudgeConfig)
    _add_section(parser, "sampling options", SamplingConfig)
    _add_train_options(parser, skip=("beta", "loss"))
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.set_defaults(func=_cmd_sweep)


def _cmd_report(args: argparse.Namespace) -> int:
    from dpokit.report import sample_before_after, write_report

    judging = JudgeConfig(**_section_from_args(args, JudgeConfig, only=("prompts", "max_prompts")))
    if judging.prompts:
        model = ModelConfig(**_section_from_args(args, ModelConfig, only=("device", "dtype")))
        sample_before_after(args.run_dir, judging.prompts, _sampling_options(args),
                            max_prompts=judging.max_prompts or 4, device=model.device, dtype=model.dtype)
    write_report(args.run_dir, log=print)
    return 0


def _add_report_command(sub) -> None:
    parser = sub.add_parser("report", help="training curves (PNG) and a one-page report.md of a run",
                            description="Write training_curves.png and report.md into a run folder; with "
                            "--prompts, also samples of the base model and the trained policy side by side.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a dpokit run folder (holding metrics.jsonl)")
    _add_section(parser, "before/after samples", JudgeConfig, only=("prompts", "max_prompts"),
                 helps={"max_prompts": "prompts sampled for the report (default here: 4)"})
    _add_section(parser, "model options", ModelConfig, only=("device", "dtype"))
    _add_section(parser, "sampling options", SamplingConfig)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.set_defaults(func=_cmd_report)


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

    _add_sample_command(sub)
    _add_evaluate_command(sub)
    _add_sweep_command(sub)
    _add_report_command(sub)
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
