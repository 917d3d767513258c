"""train/optim.py against its formulas, step by step (the fast tests benchmarks/mutation.py runs for it).

Schedule, 0-based step s, warm-up W, total T, progress p = (s − W) / max(1, T − W):
warm-up (s + 1) / W; then constant 1, linear max(0, 1 − p), cosine ½(1 + cos(π·min(1, p))).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import TrainConfig
from dpokit.train.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_its_formula_at_every_step(kind):
    warmup, total = 3, 11
    for s in range(total + 2):
        if s < warmup:
            expected = (s + 1) / warmup
        else:
            p = (s - warmup) / (total - warmup)
            expected = {"constant": 1.0, "linear": max(0.0, 1.0 - p),
                        "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, p)))}[kind]
        assert lr_factor(s, warmup, total, kind) == pytest.approx(expected, abs=1e-15), (kind, s)


def test_decay_without_room_after_warm_up_does_not_divide_by_zero():
    assert lr_factor(5, 5, 5, "linear") == 1.0  # p = 0 / max(1, 0)
    assert lr_factor(6, 5, 5, "linear") == 0.0


def test_warm_up_steps_take_precedence_over_the_ratio_which_rounds_up():
    assert warmup_steps(TrainConfig(warmup_steps=4, warmup_ratio=0.5), 100) == 4
    assert warmup_steps(TrainConfig(warmup_ratio=0.101), 10) == 2  # ⌈1.01⌉
    assert warmup_steps(TrainConfig(), 10) == 0


def test_the_scheduler_applies_the_factor_to_the_peak_rate():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(learning_rate=0.2, warmup_steps=2, lr_scheduler="linear")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.2, 0.2, 0.15, 0.1, 0.05], abs=1e-12)


def test_weight_decay_only_on_matrices_and_adam_settings_passed_through():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    cfg = TrainConfig(weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, learning_rate=1e-3)
    groups = build_optimizer(model, cfg).param_groups
    decayed, plain = groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])] and decayed["weight_decay"] == 0.1
    assert [p.shape for p in plain["params"]] == [torch.Size([4]), torch.Size([4])] and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-6 and decayed["lr"] == 1e-3


def test_a_model_without_matrices_gets_one_group():
    groups = build_optimizer(torch.nn.LayerNorm(4), TrainConfig(weight_decay=0.1)).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
