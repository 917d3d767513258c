"""The demo's learning rate and steps, studied: DPO (each β) and Preferred-FT evaluated at
checkpoints along training, every point with its standard error, and the gap between the two
methods' frontiers (upper envelopes) over the KL range both cover.

One setting per call (it trains 3 DPO runs and one Preferred-FT run on the demo's own pairs and
evaluates every checkpoint on the demo's held-out prompts, same judge and sampling seed):

    PYTHONPATH=src .venv/bin/python benchmarks/demo_lr_grid.py run /tmp/grid/lr3e-4 --lr 3e-4 --steps 80 \\
        --scheduler constant --every 10 --samples 4 --threads 1

writes OUTPUT/grid.json; then

    PYTHONPATH=src .venv/bin/python benchmarks/demo_lr_grid.py table /tmp/grid/*/grid.json

prints every point and the frontiers' gap of each setting (and of all settings pooled). Uses the
demo's private helpers, so it moves with them. About 5 minutes of one core per 80-step setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dpokit.eval.envelope import PromptFigures, frontier, frontier_gap_with_stderr, mean_gap
from dpokit.experiments.demo import sentiment as demo
from dpokit.experiments.demo.along_training import evaluate_along_training, point_of


def run(args: argparse.Namespace) -> None:
    settings = replace(demo.DemoSettings(), learning_rate=args.lr, sft_learning_rate=args.sft_lr or args.lr,
                       steps=args.steps, sft_steps=args.steps, lr_scheduler=args.scheduler,
                       checkpoint_every=args.every, eval_samples=args.samples, threads=args.threads)
    torch.set_num_threads(settings.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    base = str(demo.base_model_dir())
    runner, train_prompts = demo._demo_frontier(settings, base, out, lambda *_: None)
    pairs_file, _ = demo._demo_pairs(settings, runner, train_prompts, out, False, print)
    specs = [(demo.DPO, "sigmoid", beta, settings.learning_rate, f"dpo-beta{beta:g}") for beta in args.betas]
    specs.append((demo.PREFERRED_FT, "sft", 0.1, settings.sft_learning_rate, "preferred-ft"))
    points = []
    for method, loss, beta, lr, name in specs:
        cfg = demo._run_config(settings, base, pairs_file, out / "runs" / name, loss=loss, beta=beta,
                               steps=settings.steps, learning_rate=lr, progress="off",
                               reference_cache=out / demo.REFERENCE_CACHE, checkpoint_every=settings.checkpoint_every)
        shown = beta if method == demo.DPO else None
        done = runner.add_run(cfg, name, method=method, beta=shown, learning_rate=lr)
        mine = [*evaluate_along_training(runner, base, cfg.train.output, name, method, shown),
                point_of(done, name, settings.steps, final=True)]
        for p in mine:
            print(f"{name:<14} step {p['step']:>3}  reward {p['reward']:+.3f} ± {p['reward_stderr']:.3f}  "
                  f"KL {p['kl']:5.2f} ± {p['kl_stderr']:.2f}", flush=True)
        points += mine
    base_per_prompt = [sum(r) / len(r) for r in runner.reference_samples.rewards]
    result = {"settings": asdict(settings), "base_reward": runner.reference_row["reward"],
              "base_per_prompt": base_per_prompt, "points": points}
    (out / "grid.json").write_text(json.dumps(result))


def gap_of(points: list[dict], base_per_prompt: list[float]) -> str:
    figures = {m: [PromptFigures(p["per_prompt"]["kl"], p["per_prompt"]["reward"]) for p in points if p["method"] == m]
               for m in (demo.DPO, demo.PREFERRED_FT)}
    gap = frontier_gap_with_stderr(figures[demo.DPO], figures[demo.PREFERRED_FT], base_per_prompt)
    if gap is None:
        return "no common KL range"
    return (f"DPO − Preferred-FT frontier gap {gap.margin:+.3f} ± {gap.stderr:.3f} over "
            f"{gap.kl_start:.2f}-{gap.kl_stop:.2f} nats")


def samples_of(settings: dict) -> str:
    """Samples per held-out prompt; the first settings studied drew fewer at checkpoints than at the end."""
    if "checkpoint_eval_samples" in settings:
        return f"{settings['checkpoint_eval_samples']} (final point: {settings['eval_samples']})"
    return str(settings["eval_samples"])


def window_means(points: list[dict], base_reward: float, window: tuple[float, float]) -> str:
    """Each method's frontier, averaged over a fixed KL window (where its points reach that far)."""
    shown = []
    for method in (demo.DPO, demo.PREFERRED_FT):
        mine = [(p["kl"], p["reward"]) for p in points if p["method"] == method]
        if max(x for x, _ in mine) < window[1]:
            shown.append(f"{method} reaches only {max(x for x, _ in mine):.2f} nats")
            continue
        curve = frontier(mine, (0.0, base_reward))
        flat = [(window[0], 0.0), (window[1], 0.0)]
        shown.append(f"{method} {mean_gap(curve, flat, *window):+.3f}")
    return f"frontier's mean reward over {window[0]:g}-{window[1]:g} nats: " + ", ".join(shown)


def table(files: list[str], window: tuple[float, float]) -> None:
    pooled: list[dict] = []
    base_per_prompt = None
    for file in files:
        result = json.loads(Path(file).read_text())
        s = result["settings"]
        print(f"\n## lr {s['learning_rate']:g} (Preferred-FT {s['sft_learning_rate']:g}), {s['steps']} steps, "
              f"{s['lr_scheduler']}, every {s['checkpoint_every']} steps x {samples_of(s)} samples per prompt; "
              f"base {result['base_reward']:+.3f}")
        print("| run | step | reward | KL (nats) |\n|---|---|---|---|")
        for p in result["points"]:
            print(f"| {p['run_name']} | {p['step']} | {p['reward']:+.3f} ± {p['reward_stderr']:.3f} | "
                  f"{p['kl']:.2f} ± {p['kl_stderr']:.2f} |")
        print(f"\n{gap_of(result['points'], result['base_per_prompt'])}; "
              f"{window_means(result['points'], result['base_reward'], window)}")
        pooled += result["points"]
        base_per_prompt = result["base_per_prompt"]  # the same prompts and seed in every setting
    if len(files) > 1:
        print(f"\nall settings pooled: {gap_of(pooled, base_per_prompt)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("output")
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--sft-lr", type=float, default=None, help="Preferred-FT's learning rate (default: --lr)")
    one.add_argument("--steps", type=int, required=True)
    one.add_argument("--scheduler", default="cosine")
    one.add_argument("--every", type=int, default=10)
    one.add_argument("--samples", type=int, default=2, help="held-out samples per prompt at every point")
    one.add_argument("--betas", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    one.add_argument("--threads", type=int, default=1)
    many = sub.add_parser("table")
    many.add_argument("files", nargs="+")
    many.add_argument("--window", type=float, nargs=2, default=(0.5, 1.5),
                      help="KL range (nats) over which each method's frontier is averaged")
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else table(args.files, tuple(args.window))


if __name__ == "__main__":
    main(sys.argv[1:])
