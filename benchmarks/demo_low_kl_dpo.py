"""DPO points at low KL on the demo's pairs: does early-stopped DPO beat Preferred-FT there?

The demo's check "Preferred-FT lies below DPO's reward–KL frontier" interpolates a straight line
from the base model to β = 1 (README, "The demo"). This script measures DPO where that line is a
guess: β = 1 and β = 3 after 10 steps (and 20, 40), on the demo's own pairs, evaluated exactly
as the demo evaluates its runs (same held-out prompts, judge and sampling seed).

    PYTHONPATH=src .venv/bin/python benchmarks/demo_low_kl_dpo.py /tmp/low-kl

Uses the demo's private helpers, so it moves with them. About 2-3 minutes of one core.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dpokit.experiments.demo import sentiment as demo

RUNS = [(1.0, 10), (1.0, 20), (3.0, 10), (3.0, 40)]  # (β, steps)


def main(output: str) -> None:
    settings = demo.DemoSettings()
    torch.set_num_threads(settings.threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base = str(demo.base_model_dir())
    runner, train_prompts = demo._demo_frontier(settings, base, out, lambda *_: None)
    pairs_file, _ = demo._demo_pairs(settings, runner, train_prompts, out, False, print)
    for beta, steps in RUNS:
        name = f"dpo-beta{beta:g}-{steps}steps"
        cfg = demo._run_config(settings, base, pairs_file, out / "runs" / name, loss="sigmoid", beta=beta,
                               steps=steps, learning_rate=settings.learning_rate, progress="off",
                               reference_cache=out / demo.REFERENCE_CACHE)
        row = runner.add_run(cfg, name, method=demo.DPO, beta=beta, steps=steps,
                             learning_rate=settings.learning_rate).row
        print(f"{name:<22} reward {row['reward']:+.3f} ± {row['reward_stderr']:.3f}  "
              f"KL {row['kl']:.2f} ± {row['kl_stderr']:.2f} nats", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-low-kl")
