"""Cost of dpokit's first-batch layout check against the training run it guards, in CPU seconds.

    .venv/bin/python benchmarks/layout_guard_cost.py [--steps 100] [--threads 2] [--layout auto]

On the main benchmark model (Llama from config: vocab 8192, hidden 256, 4 layers; batch 8 pairs of
the benchmark's synthetic data), one `train` run of `--steps` steps with every default but the
layout: the check (`check_first_batch`, every pair of the first batch in each layout the scorer
may pick, with its head and attention) records its own CPU and wall seconds in
layout_check.json; the whole run's CPU seconds (setup, probes, the precomputed reference pass,
the steps, saving) are measured around `train`, and the steps' own from the step log lines.
Prints the check as a fraction of the whole run and of `--steps` steps. CPU seconds move less
than wall time when other work shares the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import MAIN, prepare  # noqa: E402

from dpokit.config import build_config  # noqa: E402
from dpokit.train.loop import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layout", default="auto", help="--layout of the run (auto checks packed and prefix-shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="dpokit-guard-"))
    prepare(scratch / "main", MAIN)
    step_cpu: list[float] = []

    def log(line: str) -> None:
        if line.startswith("step "):
            step_cpu.append(time.process_time())

    cfg = build_config({
        "model": {"model": str(scratch / "main" / "model")},
        "data": {"data": str(scratch / "main" / "pairs.jsonl"), "max_length": 2048},
        "train": {"output": str(scratch / "run"), "batch_size": 8, "max_steps": args.steps, "learning_rate": 5e-6,
                  "log_every": 1, "progress": "off", "seed": 0},
        "speed": {"layout": args.layout},
    })
    started = time.process_time()
    train(cfg, log=log)
    run_cpu = time.process_time() - started
    check = json.loads((scratch / "run" / "layout_check.json").read_text())
    steps_cpu = (step_cpu[-1] - step_cpu[0]) / (len(step_cpu) - 1) * args.steps if len(step_cpu) > 1 else float("nan")
    gaps = ", ".join(f"{c['layout']} {c['gap']:.2g}" for c in check["checked"])
    print(f"layout check: {check['cpu_seconds']:.2f} CPU s ({check['seconds']:.2f} s wall) on {check.get('pairs', '?')} "
          f"pairs, layouts {check['layouts']}, {check['lm_head']} head, {check.get('attention', '?')} attention; "
          f"gaps: {gaps}")
    print(f"whole {args.steps}-step run: {run_cpu:.1f} CPU s; its steps alone: {steps_cpu:.1f} CPU s "
          f"(from the step lines, scaled to {args.steps} steps)")
    print(f"check = {check['cpu_seconds'] / run_cpu:.2%} of the run, {check['cpu_seconds'] / steps_cpu:.2%} of "
          f"{args.steps} steps (CPU seconds, threads {args.threads})")


if __name__ == "__main__":
    main()
