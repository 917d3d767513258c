"""`dpokit sample`, `evaluate`, `sweep` and `report`: parse, build configs, call the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dpokit.cli.common import add_debug_flag, check_config_apart, config_from_args, show_progress
from dpokit.cli.common import add_section as _add_section
from dpokit.cli.common import add_train_options as _add_train_options
from dpokit.cli.common import section_from_args as _section_from_args
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
    validate_sampling,
)
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import RUN_DATA_SETTINGS, evaluate_models, format_table, run_template_kwargs
from dpokit.eval.report import CURVES_FILE, REPORT_FILE, SAMPLES_FILE, sample_before_after, write_report
from dpokit.eval.sampling import check_prompt, read_prompts, run_sample
from dpokit.experiments.sweep import run_sweep
from dpokit.io import atomic_write_text, console
from dpokit.paths import check_creatable, check_outputs_apart

# `evaluate --data` takes every data flag of `train` but --eval-data; for a dpokit run each one
# defaults to the run's own setting (dpokit_config.yaml).
EVALUATE_DATA_OPTIONS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name != "eval_data")


def _model_options(args: argparse.Namespace) -> ModelConfig:
    model = ModelConfig(**_section_from_args(args, ModelConfig))
    if not model.model:
        raise DpokitError("missing required option: --model")
    return model


def _sampling_options(args: argparse.Namespace) -> SamplingConfig:
    sampling = SamplingConfig(**_section_from_args(args, SamplingConfig))
    validate_sampling(sampling)
    return sampling


# The model options of the commands that only run forward passes (no loss scaling, no gradients).
_FORWARD_DTYPE_HELP = "compute precision of the forward passes: fp32, or bf16 / fp16 autocast (default: fp32)"
_SAMPLE_MODEL_OPTIONS = ("model", "tokenizer", "dtype", "device", "trust_remote_code")


def _add_model_and_sampling(parser: argparse.ArgumentParser, helps: dict[str, str], only: tuple[str, ...] = ()
                            ) -> None:
    _add_section(parser, "model options", ModelConfig, only=only, helps={"dtype": _FORWARD_DTYPE_HELP, **helps})
    _add_section(parser, "sampling options", SamplingConfig)
    _add_section(parser, "output options", TrainConfig, only=("progress",))
    add_debug_flag(parser)


def _cmd_sample(args: argparse.Namespace) -> int:
    model, sampling = _model_options(args), _sampling_options(args)
    command = SampleCommandConfig(**_section_from_args(args, SampleCommandConfig))
    judging = JudgeConfig(**_section_from_args(args, JudgeConfig, only=("prompts", "max_prompts")))
    if bool(command.prompt) == bool(judging.prompts):
        raise DpokitError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
    if command.samples_output:
        partial = command.samples_output + ".partial"  # rows stream here first
        check_outputs_apart([("--output", command.samples_output), ("--output", partial)],
                            [("--model", model.model), ("--tokenizer", model.tokenizer), ("--prompts", judging.prompts)])
        check_creatable(command.samples_output, "--output", folder=False)
    prompts = [check_prompt(command.prompt, "--prompt")] if command.prompt else read_prompts(
        judging.prompts, judging.max_prompts)
    # A dpokit run is sampled with the chat-template arguments it was trained with.
    run_sample(model, prompts, sampling, template_kwargs=run_template_kwargs(model.model),
               output=command.samples_output, progress=show_progress(args))
    return 0


def add_sample_command(sub) -> None:
    parser = sub.add_parser("sample", help="sample completions from a model",
                            description="Sample completions (KV cache, batched, seeded; chat template for "
                            "message prompts; stops at EOS). Greedy with --temperature 0.")
    _add_section(parser, "prompt and output options", SampleCommandConfig)
    _add_section(parser, "prompt file options", JudgeConfig, only=("prompts", "max_prompts"))
    parser.add_argument("--seed", dest="sample_seed", default=argparse.SUPPRESS, metavar="SEED",
                        help="same as --sample-seed")
    _add_model_and_sampling(parser, {"model": "the model to sample from: a model folder or hub id (required)"},
                            only=_SAMPLE_MODEL_OPTIONS)
    parser.set_defaults(func=_cmd_sample)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if hasattr(args, "renamed_reference"):
        raise DpokitError("evaluate: the reference model is now --reference-model, as in train (where --reference "
                          f"chooses auto, precomputed or live): use --reference-model {args.renamed_reference}")
    model, sampling = _model_options(args), _sampling_options(args)
    command = EvaluateCommandConfig(**_section_from_args(args, EvaluateCommandConfig))
    data_flags = _section_from_args(args, DataConfig, only=EVALUATE_DATA_OPTIONS)
    judging = JudgeConfig(**_section_from_args(args, JudgeConfig))
    batch = _section_from_args(args, TrainConfig, only=("batch_size",)).get("batch_size", 8)
    if command.evaluation_output:
        check_outputs_apart([("--output", command.evaluation_output)], [
            ("--model", model.model), ("--reference-model", model.reference_model), ("--tokenizer", model.tokenizer),
            ("--data", data_flags.get("data")), ("--prompts", judging.prompts), ("--judge", judging.judge)])
        check_creatable(command.evaluation_output, "--output", folder=False)
    # --json keeps stdout for the JSON object alone; progress lines go to stderr.
    log = (lambda line: print(line, file=sys.stderr)) if command.json_output else print
    result = evaluate_models(model, data=data_flags, loss_overrides=_section_from_args(args, LossConfig),
                             batch_size=batch, judging=judging, sampling=sampling, progress=show_progress(args),
                             log=log)
    if command.evaluation_output:
        atomic_write_text(command.evaluation_output, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if command.json_output else format_table(result))
    return 0


def add_evaluate_command(sub) -> None:
    parser = sub.add_parser("evaluate", help="preference accuracy, judged reward, win rate and KL of a policy",
                            description="Compare a policy with its reference: implicit-reward figures on "
                            "preference pairs (--data), and on prompts (--prompts) the judged reward of each, "
                            "the win rate (--judge) and KL(policy || reference) from policy samples.")
    _add_section(parser, "evaluation options", EvaluateCommandConfig)
    _add_section(parser, "preference data options (default: the run's own settings, as train's flags)", DataConfig,
                 only=EVALUATE_DATA_OPTIONS, helps={"data": "preference pairs to compute reward accuracy and margins on"},
                 inherited=RUN_DATA_SETTINGS)
    _add_section(parser, "implicit reward options (default: the run's own)", LossConfig,
                 inherited=[f.name for f in dataclasses.fields(LossConfig)])
    _add_section(parser, "batch options", TrainConfig, only=("batch_size",))
    _add_section(parser, "prompt and judge options", JudgeConfig)
    _add_model_and_sampling(parser, {
        "model": "the policy to evaluate: a model folder (a dpokit run) or hub id (required)",
        "reference_model": "the reference model folder or hub id (default: the model a dpokit run started from, "
                           "or the --reference-model it was trained with)"})
    # evaluate used to take the reference model as --reference, which in train chooses auto|precomputed|live.
    parser.add_argument("--reference", dest="renamed_reference", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(func=_cmd_evaluate)


def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep = SweepConfig(**_section_from_args(args, SweepConfig, only=("betas",)))
    betas = list(sweep.betas)
    # Each --loss is one run's loss, exactly as train reads it (sigmoid,sft: one combined loss).
    losses = [spec.strip() for spec in getattr(args, "losses", None) or [sweep.losses]]
    base = config_from_args(args, {"loss": {"loss": losses[0]}})  # checked with the first; each run with its own
    check_config_apart(args, base.train.output)
    run_sweep(base, betas, losses, JudgeConfig(**_section_from_args(args, JudgeConfig)), _sampling_options(args),
              log=console)
    return 0


def add_sweep_command(sub) -> None:
    parser = sub.add_parser("sweep", help="train per β (and loss), evaluate each, draw the reward-KL frontier",
                            description="Train once per β (and per --loss), evaluate each run on --prompts with "
                            "--judge, and write frontier.png and frontier.csv (judged reward vs KL) in --output.")
    _add_section(parser, "sweep options", SweepConfig, only=("betas",))
    losses = next(f for f in dataclasses.fields(SweepConfig) if f.name == "losses")
    parser.add_argument(losses.metadata["flag"], dest="losses", action="append", default=argparse.SUPPRESS,
                        metavar="LOSS", help=f"{losses.metadata['help']} (default: {losses.default})")
    _add_section(parser, "prompt and judge options", JudgeConfig)
    _add_section(parser, "sampling options", SamplingConfig)
    _add_train_options(parser, skip=("beta", "loss"))
    add_debug_flag(parser)
    parser.set_defaults(func=_cmd_sweep)


def _cmd_report(args: argparse.Namespace) -> int:
    judging = JudgeConfig(**_section_from_args(args, JudgeConfig, only=("prompts", "max_prompts")))
    written = [("RUN_DIR's", Path(args.run_dir) / name) for name in (REPORT_FILE, CURVES_FILE, SAMPLES_FILE)]
    check_outputs_apart(written, [("--prompts", judging.prompts)])
    if judging.prompts:
        model = ModelConfig(**_section_from_args(args, ModelConfig, only=("device", "dtype")))
        max_prompts = 4 if judging.max_prompts is None else judging.max_prompts  # 0 is refused, not 4
        sample_before_after(args.run_dir, judging.prompts, _sampling_options(args),
                            max_prompts=max_prompts, device=model.device, dtype=model.dtype)
    write_report(args.run_dir, log=print)
    return 0


def add_report_command(sub) -> None:
    parser = sub.add_parser("report", help="training curves (PNG) and a one-page report.md of a run",
                            description="Write training_curves.png and report.md into a run folder; with "
                            "--prompts, also samples of the base model and the trained policy side by side.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a dpokit run folder (holding metrics.jsonl)")
    _add_section(parser, "before/after samples", JudgeConfig, only=("prompts", "max_prompts"),
                 helps={"max_prompts": "prompts sampled for the report (default here: 4)"})
    _add_section(parser, "model options", ModelConfig, only=("device", "dtype"), helps={"dtype": _FORWARD_DTYPE_HELP})
    _add_section(parser, "sampling options", SamplingConfig)
    add_debug_flag(parser)
    parser.set_defaults(func=_cmd_report)
