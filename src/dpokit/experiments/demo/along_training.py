"""A run's points along its training, as the DPO paper draws its frontier (Figure 2: every run
evaluated at checkpoints until it converges, so each method traces a curve through low KL).

The demo trains each run with a checkpoint every `checkpoint_every` steps. The last checkpoint is
the run's final model, which the frontier already evaluated in full; every earlier one is loaded
into a copy of the base model, evaluated exactly as the final model (the same held-out prompts,
sampling settings and seed: the same random numbers, so two points differ by their models, not by
their samples' luck), and then removed, so the run folder holds what a plain run's holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from dpokit.experiments.frontier import FrontierRunner, RunEvaluation
from dpokit.model.load import load_policy
from dpokit.train.checkpoint import STATE_FILE, list_checkpoints
from dpokit.train.distributed import Distributed
from dpokit.train.state import load_trainable_state


def point_of(done: RunEvaluation, run_name: str, step: int, *, final: bool) -> dict:
    """A frontier row as a point of the demo: which run, after how many steps, and its figures
    per held-out prompt (for the frontiers' comparison)."""
    per_prompt = done.figures["per_prompt"]
    return {**done.row, "run_name": run_name, "step": step, "final": final,
            "samples_per_prompt": done.figures["judged"]["samples_per_prompt"],
            "per_prompt": {"kl": per_prompt["kl"], "reward": per_prompt["reward_policy"]}}


def evaluate_along_training(runner: FrontierRunner, base: str, run_dir: Path, run_name: str, method: str,
                            beta: float | None) -> list[dict]:
    """Evaluate every checkpoint of `run_dir` but its last (the final model), oldest first; each is
    removed once evaluated. Returns their points."""
    checkpoints = list_checkpoints(run_dir)[:-1]
    if not checkpoints:
        return []
    policy = load_policy(base, torch.device("cpu")).eval()
    points = []
    for folder in checkpoints:
        step = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["step"]
        load_trainable_state(policy, load_file(str(folder / "model.safetensors")), Distributed())
        done = runner.evaluate_policy(policy, f"{run_name}-step{step}", method, beta)
        points.append(point_of(done, run_name, step, final=False))
        shutil.rmtree(folder)
    return points
