"""AdamW and the learning-rate schedule: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch

from dpokit.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay only on matrices (not norms or biases).

    Fused where every parameter can take it: one pass over each parameter and its two moments,
    where the per-tensor loop torch picks by default on the CPU goes over them several times and
    allocates temporaries as large as the parameter (SmolLM2-135M's 134.5M parameters, fp32, 2
    threads: 69 ms a step against 547; benchmarks/RESULTS.md section 9). The update is AdamW's to
    float rounding, and it is the kernel transformers' Trainer (so TRL) uses by default."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused_adamw_fits(params) or None,
    )


def fused_adamw_fits(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain floating-point tensors on the CPU
    or a CUDA device (not FSDP2's sharded DTensors: left to torch's own choice there)."""
    sharded: tuple[type, ...] = ()
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        sharded = (DTensor,)
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                and not isinstance(p, sharded) for p in params)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`.

    Warm-up reaches the peak at step `warmup - 1`; the decay then runs toward 0 at `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, cfg.lr_scheduler)
    )
