"""Wrapping for the run's strategy, in one place: the loop does not branch on it.

`parallelize` wraps the model once (DDP, or FSDP2 sharding); `unwrap`, `gradient_sync`,
`clip_grad_norm` and `grad_scaler` are the few places where the loop touches the wrapped model,
each the same call for every strategy and for a single process.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dpokit.config import ScaleConfig
from dpokit.errors import DpokitError
from dpokit.train.distributed import Distributed


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its `_no_split_modules` names), in order."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # not a transformers model: fall back to the children of its largest ModuleList
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def parallelize(model: Any, *, scale: ScaleConfig, ctx: Distributed) -> Any:
    """Wrap `model` for this run's strategy; the one place that knows which strategy runs.

    - world of one (and not fsdp): the model itself.
    - ddp: DistributedDataParallel. A model with nothing to train (the frozen reference) needs no
      gradient sync and is returned as it is.
    - fsdp: FSDP2 `fully_shard` on every transformer block, then on the root, so each rank holds
      1/N of the weights, gradients and optimizer state and gathers one block at a time. A frozen
      reference is sharded the same way. Optional CPU offload of the shards.
    Anything that is not a module (None, or the adapters-disabled LoRA reference, which is the
    policy itself) passes through unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        return model
    strategy = scale.parallel
    if strategy == "fsdp":
        if not ctx.active:
            raise DpokitError("--parallel fsdp needs a torchrun launch (torchrun --nproc-per-node N -m dpokit train ...)")
        return _fully_shard(model, scale)
    if ctx.world_size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # No buffer sync per forward: the buffers (rotary tables) are constants, and a broadcast per
    # forward would tie every forward pass, evaluation included, to the other ranks.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync)


def _fully_shard(model: torch.nn.Module, scale: ScaleConfig) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device
    if scale.fsdp_cpu_offload and device.type != "cuda":
        raise DpokitError("--fsdp-cpu-offload needs GPUs: it keeps the shards in CPU memory and computes on the GPU")
    offload = CPUOffloadPolicy() if scale.fsdp_cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model)
    if not blocks:
        raise DpokitError("--parallel fsdp: found no transformer blocks to shard in this model")
    for block in blocks:
        fully_shard(block, offload_policy=offload)
    # The root holds what is left (embeddings, final norm, LM head): tied weights stay together.
    fully_shard(model, offload_policy=offload)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: sync gradients across ranks only when `enabled`
    (the step's last micro-batch); the others accumulate locally, saving one all-reduce each."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm; return it as a plain tensor (FSDP2 gives a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def grad_scaler(device: torch.device, dtype: str, ctx: Distributed) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; for bf16 and fp32 the scaler is a pass-through
    (disabled), so the loop calls it the same way for every dtype. Across processes the sharded
    scaler all-reduces "found an inf", so every rank skips the same steps (FSDP2 shards differ)."""
    enabled = dtype == "fp16"
    if ctx.active:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)
