"""`dpokit demo` (the built-in sentiment experiment) and `dpokit online` (online / iterative DPO)."""

from __future__ import annotations

import argparse

from dpokit.cli.common import (
    add_debug_flag,
    add_section,
    add_train_options,
    check_config_apart,
    config_from_args,
    section_from_args,
    show_progress,
)
from dpokit.config import (
    DemoConfig,
    JudgeConfig,
    OnlineConfig,
    SamplingConfig,
    TrainConfig,
    validate_sampling,
)
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import format_number
from dpokit.eval.sampling import read_prompts
from dpokit.experiments.demo.sentiment import run_demo, settings_for
from dpokit.experiments.online import run_online
from dpokit.io import console

# `dpokit online` generates its training pairs every round, so these train options do not apply.
ONLINE_SKIPS = ("data", "eval_data")


def _cmd_demo(args: argparse.Namespace) -> int:
    demo = DemoConfig(**section_from_args(args, DemoConfig))
    if demo.quick and demo.full:
        raise DpokitError("give at most one of --quick and --full")
    if demo.demo_threads < 1:
        raise DpokitError(f"--threads must be at least 1; got {demo.demo_threads}")
    preset = "quick" if demo.quick else "full" if demo.full else "default"
    run_demo(settings_for(preset, seed=demo.demo_seed, threads=demo.demo_threads), demo.demo_output, online=demo.online,
             progress=show_progress(args), log=console)
    return 0


def add_demo_command(sub) -> None:
    parser = sub.add_parser(
        "demo", help="offline demo: the DPO paper's sentiment experiment on a bundled small model",
        description="The DPO paper's controlled-sentiment experiment in miniature, offline: sample completions of "
        "review openings from the bundled base model, judge them with VADER sentiment, pair higher over lower, "
        "train DPO at several β and Preferred-FT, add online DPO rounds, and measure each on held-out prompts "
        "(judged reward and KL to the base model). Writes the reward-KL frontier, summary.json and the trained "
        "models to --output. Needs no download.")
    add_section(parser, "demo options", DemoConfig)
    add_section(parser, "output options", TrainConfig, only=("progress",))
    add_debug_flag(parser)
    parser.set_defaults(func=_cmd_demo)


def _cmd_online(args: argparse.Namespace) -> int:
    judging = JudgeConfig(**section_from_args(args, JudgeConfig))
    online = OnlineConfig(**section_from_args(args, OnlineConfig))
    sampling = SamplingConfig(**section_from_args(args, SamplingConfig))
    validate_sampling(sampling)
    if not judging.prompts or not judging.judge:
        raise DpokitError("dpokit online needs --prompts (to sample from) and --judge (to score the samples)")
    # Each round writes its own pairs file; the placeholder satisfies the config's check until then.
    base = config_from_args(args, {"data": {"data": "(sampled each round)"}})
    check_config_apart(args, base.train.output)
    prompts = read_prompts(judging.prompts, judging.max_prompts)
    eval_prompts = read_prompts(online.eval_prompts) if online.eval_prompts else None
    summary = run_online(base, prompts, online, judging, sampling, eval_prompts=eval_prompts,
                         progress=show_progress(args), log=console)
    console(f"{'round':<8} {'pairs':>6} {'reward':>10} {'KL':>10} {'win rate':>9}")
    console(f"{'start':<8} {'-':>6} {format_number(summary['points'][0]['reward']):>10} {0.0:>10.4f} {0.5:>9.3f}")
    for r in summary["rounds"]:
        p = r["point"]
        console(f"{r['round']:<8} {r['pair_stats']['pairs']:>6} {format_number(p['reward']):>10} "
                f"{format_number(p['kl']):>10} {p['win_rate']:>9.3f}")
    return 0


def add_online_command(sub) -> None:
    parser = sub.add_parser(
        "online", help="online DPO: rounds of sample, judge, pair best over worst, train, evaluate",
        description="Online (iterative) DPO: each round samples --samples-per-prompt responses per prompt from the "
        "current policy, scores them with --judge, pairs the best over the worst, DPO-trains from the current "
        "policy with the reference fixed at the starting --model, and evaluates (judged reward, win rate, KL to "
        "the start) on --eval-prompts. Writes OUTPUT/round-N/, OUTPUT/pairs/, online.json, frontier.csv/png. An "
        "interrupted run continues with the same command and --resume auto, at the round and step it stopped in.")
    add_section(parser, "online options", OnlineConfig)
    add_section(parser, "prompt and judge options", JudgeConfig)
    add_section(parser, "sampling options (pair samples and evaluation)", SamplingConfig)
    add_train_options(parser, skip=ONLINE_SKIPS)
    add_debug_flag(parser)
    parser.set_defaults(func=_cmd_online)
