"""Training settings do what they say: the learning-rate schedule follows its formula step by step,
--max-grad-norm bounds the applied update, weight decay skips norms and biases. Each test catches:
a constant learning rate with no warm-up, clipping turned off, or decay on every parameter
(`train/optim.py`, `train/step.py`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import TrainConfig, build_config
from dpokit.train.loop import train
from dpokit.train.optim import build_optimizer, build_scheduler
from helpers.toy import build_tiny_llama, build_tokenizer

# Peak 1, warm-up 2 of 6 steps: warm-up reaches the peak at step index 1, then the decay runs over
# steps 2..5 with progress (s - 2) / 4 = 0, 1/4, 1/2, 3/4. Written out by hand, not with lr_factor.
COS = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 1, 0.853553, 0.5, 0.146447
SCHEDULES = {
    "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
    "cosine": [0.5, 1.0, *COS],
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_learning_rate_schedule_matches_its_formula_step_by_step(kind):
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=2, lr_scheduler=kind)
    assert _learning_rates(cfg, total_steps=6, steps=6) == pytest.approx([1e-3 * f for f in SCHEDULES[kind]],
                                                                           rel=1e-12)


def test_warmup_ratio_counts_whole_steps():
    cfg = TrainConfig(learning_rate=1.0, warmup_ratio=0.25, lr_scheduler="constant")  # ceil(0.25 x 10) = 3
    assert _learning_rates(cfg, total_steps=10, steps=4) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def _learning_rates(cfg: TrainConfig, *, total_steps: int, steps: int) -> list[float]:
    """The learning rate each of the first `steps` optimizer steps uses, through build_optimizer
    and build_scheduler as training builds them."""
    module = torch.nn.Module()
    module.register_parameter("weight", torch.nn.Parameter(torch.zeros(2, 2)))
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps)
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def _config(model_dir, data, out, **train_opts):
    section = {"output": str(out), "batch_size": 4, "progress": "off", "weight_decay": 0.0, **train_opts}
    return build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                         "train": section})


def test_the_training_loop_steps_with_the_scheduled_learning_rate(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model_dir, toy_data[0], out, learning_rate=1e-3, max_steps=6, warmup_steps=2,
                  lr_scheduler="cosine"), log=lambda _: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert logged == pytest.approx([1e-3 * f for f in SCHEDULES["cosine"]], rel=1e-9)


def _largest_move(model_dir, data, out, max_grad_norm) -> float:
    """Largest |Δw| over all coordinates after one AdamW step of the real loop at lr 1e-2."""
    train(_config(model_dir, data, out, learning_rate=1e-2, max_steps=1, max_grad_norm=max_grad_norm),
          log=lambda _: None)
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    return max((after[name].double() - before[name].double()).abs().max().item() for name in before)


def test_max_grad_norm_bounds_the_applied_update(tiny_model_dir, toy_data, tmp_path):
    # Adam's first step moves each coordinate by lr·g/(|g| + ε) (m̂ = g, v̂ = g²). With the whole
    # gradient clipped to norm c, every |g| <= c, so no coordinate moves more than lr·c/ε: with
    # c = 1e-9 and ε = 1e-8, a tenth of the learning rate. Unclipped, it moves by about lr.
    lr, c, eps = 1e-2, 1e-9, 1e-8
    clipped = _largest_move(tiny_model_dir, toy_data[0], tmp_path / "clipped", c)
    assert clipped <= lr * c / eps * (1 + 1e-4), clipped  # float32 rounding of w + Δw
    unclipped = _largest_move(tiny_model_dir, toy_data[0], tmp_path / "unclipped", None)
    assert unclipped > 0.9 * lr  # the premise: without clipping the same step is ten times larger


def test_weight_decay_skips_norms_and_biases():
    tok = build_tokenizer("word")
    model = build_tiny_llama(tok, seed=0)
    model.config.attention_bias = True
    model = type(model)(model.config)  # q, k, v and o projections with biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(0.5, 1.0)  # biases start at 0, which decay would leave at 0
    lr, decay = 0.5, 0.1
    optimizer = build_optimizer(model, TrainConfig(learning_rate=lr, weight_decay=decay))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(name.endswith(".bias") for name in before) and any("norm" in name for name in before)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW's only move is the decay, w <- w (1 - lr·λ)
    optimizer.step()
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            assert torch.equal(p.detach(), before[name] * (1 - lr * decay)), name
        else:
            assert torch.equal(p.detach(), before[name]), name  # norms and biases: never decayed


def test_adamw_is_fused_on_the_cpu_and_its_updates_are_adamws_written_out():
    # The fused kernel (one pass per parameter; train/optim.py) must still be AdamW: two steps with
    # known gradients against the update written out by hand, in float64 so only the kernel's
    # fp32 rounding is left (a few ulps of the update: 1e-5 relative bounds it with room).
    lr, b1, b2, eps, decay = 0.01, 0.9, 0.99, 1e-8, 0.1
    model = torch.nn.Linear(4, 3)
    w0 = model.weight.detach().double().clone()
    optimizer = build_optimizer(model, TrainConfig(learning_rate=lr, adam_beta1=b1, adam_beta2=b2,
                                                   adam_epsilon=eps, weight_decay=decay))
    assert optimizer.defaults["fused"] is True
    grads = [torch.linspace(-1, 1, 12).reshape(3, 4), torch.linspace(0.5, -2, 12).reshape(3, 4)]
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        model.weight.grad = g.clone()
        model.bias.grad = torch.zeros(3)
        optimizer.step()
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * decay) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(model.weight.detach().double() - w0, w - w0, rtol=1e-5, atol=1e-9)
