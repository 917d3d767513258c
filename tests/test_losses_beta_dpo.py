"""β-DPO (Wu et al. 2024): β adapted per batch from the margins' running mean, outliers filtered."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import LossConfig
from dpokit.losses import compile_loss
from dpokit.train.checkpoint import list_checkpoints
from helpers.toy import make_pairs, write_jsonl


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def _batch(margins: list[float]) -> dict[str, torch.Tensor]:
    """Pairs whose margin Δ = lr_c − lr_r is `margins` (reference and rejected log-probs 0)."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    zeros = [0.0] * len(margins)
    return dict(policy_chosen_logps=t(margins).requires_grad_(True), policy_rejected_logps=t(zeros),
                reference_chosen_logps=t(zeros), reference_rejected_logps=t(zeros),
                chosen_lengths=t([3.0] * len(margins)), rejected_lengths=t([3.0] * len(margins)))


def _plan(running_margin: float | None, **options):
    plan = compile_loss(LossConfig(loss=("beta_dpo",), beta=0.5, **options))
    if running_margin is not None:
        plan.load_state_dict({"running_margin": running_margin, "dtype": "float64"})
    return plan


def test_one_batch_by_hand():
    # M0 before = 0; batch margins Δ = [0.5, 1, 4], mean 11/6; M0 = 0.9·0 + 0.1·11/6 = 11/60.
    # ρB = 1.5 → keep 2: the margins nearest M0 are 0.5 and 1, M̄ = 0.75.
    # β_batch = 0.5·(1 + 0.6·(0.75 − 11/60)) = 0.67; kept losses scaled by B/k = 3/2.
    plan = _plan(0.0, beta_dpo_alpha=0.6, beta_dpo_rho=0.5)
    out = plan(**_batch([0.5, 1.0, 4.0]))
    expected = [1.5 * sp(-0.67 * 0.5), 1.5 * sp(-0.67 * 1.0), 0.0]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert plan.state_dict()["running_margin"] == pytest.approx(11 / 60, abs=1e-15)
    # Rewards stay β·lr at the configured β (the authors' convention), for every pair
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, 0.5, 2.0], dtype=torch.float64))


def test_margins_above_the_running_mean_raise_beta_and_below_lower_it():
    dpo = compile_loss(LossConfig(loss=("sigmoid",), beta=0.5))
    for margins, running, direction in (([1.0, 2.0, 3.0], 0.0, "raised"), ([1.0, 2.0, 3.0], 10.0, "lowered")):
        beta_dpo = _plan(running, beta_dpo_alpha=0.6, beta_dpo_rho=1.0)(**_batch(margins)).losses
        plain = dpo(**_batch(margins)).losses
        # −log σ(βΔ) falls as β grows when Δ > 0: a raised β gives smaller losses, a lowered one larger
        assert bool((beta_dpo < plain).all()) if direction == "raised" else bool((beta_dpo > plain).all())


def test_dropped_pairs_get_no_gradient_and_kept_ones_the_dpo_sign():
    x = _batch([0.5, 1.0, 40.0])  # 40 is the outlier
    _plan(0.0, beta_dpo_rho=0.5)(**x).losses.sum().backward()
    grad = x["policy_chosen_logps"].grad
    assert grad[2] == 0 and bool((grad[:2] < 0).all())


def test_only_training_moves_the_running_mean():
    plan = _plan(1.0)
    with torch.no_grad():  # evaluation
        plan(**_batch([5.0, 6.0]))
    assert plan.state_dict()["running_margin"] == 1.0
    plan(**_batch([5.0, 6.0]))
    assert plan.state_dict()["running_margin"] == pytest.approx(0.9 + 0.1 * 5.5)


def test_a_restored_plan_continues_exactly():
    batches = [_batch([0.1 * i, 0.3 * i + 1, -0.2 * i]) for i in range(1, 5)]
    whole = _plan(None)
    expected = [whole(**b).losses.detach() for b in batches]
    first = _plan(None)
    for b in batches[:2]:
        first(**b)
    resumed = compile_loss(LossConfig(loss=("beta_dpo",), beta=0.5))
    resumed.load_state_dict(first.state_dict())
    for b, want in zip(batches[2:], expected[2:], strict=True):
        assert torch.equal(resumed(**b).losses.detach(), want)


# Through the CLI: a run stopped by SIGTERM and resumed equals an uninterrupted one bitwise,
# which needs M0 from the checkpoint (a fresh M0 changes β_batch and so the weights).

STEPS = 6


def _args(model_dir, data, out, *extra):
    return [sys.executable, "-m", "dpokit", "train", "--model", str(model_dir), "--data", str(data), "--output",
            str(out), "--loss", "beta_dpo", "--max-steps", str(STEPS), "--batch-size", "4", "--learning-rate",
            "1e-3", "--max-length", "32", "--progress", "off", *extra]


def test_sigterm_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(24, seed=5))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_args(tiny_model_dir, data, tmp_path / "full"), capture_output=True, text=True, env=env,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "run"
    proc = subprocess.Popen(_args(tiny_model_dir, data, out, "--save-every", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    resumed = subprocess.run(_args(tiny_model_dir, data, out, "--save-every", "2", "--resume", "auto"),
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Path(out / "metrics.jsonl").read_text().count("\n") == STEPS
