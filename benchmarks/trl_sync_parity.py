"""TR-DPO parity with TRL 1.16: dpokit's reference after N steps against TRL's SyncRefModelCallback.

    PYTHONPATH=src /tmp/trlenv/bin/python benchmarks/trl_sync_parity.py [--steps 10] [--tau 3]

Runs in TRL's environment (trl 1.16.0, with dpokit from `src/` on the path). For α = 0.6 (TRL's
default) and α = 1 (the hard update):

1. a real dpokit run (`train`, tiny Llama from config, fp32, CPU) of `--steps` steps with
   `--sync-reference-steps τ --sync-reference-alpha α`, checkpointing after every step: the
   policy weights θ_1..θ_N and dpokit's reference after each step;
2. TRL's callback replayed on the same sequence of policy weights: a reference loaded from the
   initial model, then for k = 1..N the policy set to θ_k and `SyncRefModelCallback.on_step_end`
   called with `state.global_step = k`, `ref_model_sync_steps = τ`, `ref_model_mixup_alpha = α`
   (TRL's trainer calls it after each optimizer step, with global_step already advanced).

Prints the largest |dpokit − TRL| over every weight and every step, in fp32 (dpokit's own loop
against TRL's callback on its checkpointed weights), and in fp64 (both rules applied to the
same weights cast to float64: dpokit's `reference_sync_due` + `sync_reference`, TRL's callback).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
from transformers.utils import logging as hf_logging
from trl.trainer.callbacks import SyncRefModelCallback

from dpokit.config import build_config
from dpokit.model.reference import reference_sync_due, sync_reference
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model builders
from helpers.toy import make_pairs, save_tiny_model, write_jsonl  # noqa: E402


def dpokit_run(folder: Path, steps: int, tau: int, alpha: float) -> tuple[Path, list[Path]]:
    """A dpokit TR-DPO run checkpointed after every step: the model folder and the checkpoints."""
    model = save_tiny_model(folder / "model", seed=0)
    data = write_jsonl(folder / "pairs.jsonl", make_pairs(8 * steps, seed=3))
    cfg = build_config({"model": {"model": str(model)}, "data": {"data": str(data), "max_length": 32},
                        "loss": {"sync_reference_steps": tau, "sync_reference_alpha": alpha},
                        "train": {"output": str(folder / "run"), "max_steps": steps, "batch_size": 8,
                                  "learning_rate": 1e-3, "save_every": 1, "keep_checkpoints": steps,
                                  "progress": "off"}})
    train(cfg, log=lambda _: None)
    return model, list_checkpoints(folder / "run")


def max_diff(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> float:
    return max((p.detach().double() - weights[n].double()).abs().max().item() for n, p in module.named_parameters())


def compare(steps: int, tau: int, alpha: float, accelerator: Accelerator) -> tuple[float, float, float]:
    """(fp32 max |dpokit loop − TRL callback| over all steps, fp64 max |dpokit rule − TRL rule|,
    max |final reference − initial weights|: how far the reference moved)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, checkpoints = dpokit_run(Path(tmp), steps, tau, alpha)
        assert len(checkpoints) == steps, checkpoints
        load = lambda dtype: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).requires_grad_(False)  # noqa: E731
        policy32, trl32 = load(torch.float32), load(torch.float32)
        policy64, trl64, ours64 = load(torch.float64), load(torch.float64), load(torch.float64)
        callbacks = {32: SyncRefModelCallback(trl32, accelerator), 64: SyncRefModelCallback(trl64, accelerator)}
        args, control = SimpleNamespace(ref_model_sync_steps=tau, ref_model_mixup_alpha=alpha), TrainerControl()
        worst32 = worst64 = 0.0
        for step, checkpoint in enumerate(checkpoints, start=1):
            theta = load_file(str(checkpoint / "model.safetensors"))
            policy32.load_state_dict(theta, strict=False)
            policy64.load_state_dict({n: t.double() for n, t in theta.items()}, strict=False)
            for bits, policy in ((32, policy32), (64, policy64)):
                callbacks[bits].on_step_end(args, TrainerState(global_step=step), control, model=policy)
            if reference_sync_due(step, tau):
                sync_reference(ours64, policy64, alpha)
            worst32 = max(worst32, max_diff(trl32, load_file(str(checkpoint / "reference.safetensors"))))
            worst64 = max(worst64, max_diff(trl64, dict(ours64.named_parameters())))
        initial = load_file(str(Path(model_dir) / "model.safetensors"))
        moved = max_diff(trl32, initial)  # the reference did move: the comparison is not of two fixed models
        assert moved > 0, "the reference never moved"
    return worst32, worst64, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tau", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    accelerator = Accelerator(cpu=True)  # TRL's callback reads the accelerator state (DeepSpeed or not)
    syncs = [s for s in range(1, args.steps + 1) if reference_sync_due(s, args.tau)]
    print(f"steps {args.steps}, tau {args.tau}: syncs after steps {syncs}")
    for alpha in (0.6, 1.0):
        fp32, fp64, moved = compare(args.steps, args.tau, alpha, accelerator)
        print(f"alpha {alpha}: max |dpokit - TRL| fp32 (dpokit's loop) {fp32:.3g}, fp64 (same weights) {fp64:.3g}; "
              f"the reference moved up to {moved:.3g} from the initial weights")


if __name__ == "__main__":
    main()
