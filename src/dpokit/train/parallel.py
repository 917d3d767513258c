"""Scale out on PyTorch's own engine: torchrun launches, `parallelize` wraps, the loop stays the same.

`torchrun --nproc-per-node N -m dpokit train ...` starts N processes; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) tells each one who it is. `Distributed` holds
that and the few collectives the loop needs; with no torchrun it is a world of one whose
collectives return their input, so a single-process run takes the very same code path.

How the work is split (the loop does not branch on the strategy):
- Each optimizer step takes `batch x accumulation x world` pairs from the shared seeded epoch
  order; rank r takes every world-th of them (`rank_step`), so ranks see disjoint pairs.
- Every rank runs the same number of micro-batches (a rank short of pairs runs a stand-in
  micro-batch whose loss is multiplied by 0): DDP and FSDP2 need every rank in every collective.
- DDP and FSDP2 both *average* gradients over ranks, so each rank scales its summed loss by
  `world / pairs in the global step`: the average of those is the global sum / global count,
  the same update as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dpokit.config import RunConfig
from dpokit.errors import DpokitError


@dataclass
class Distributed:
    """This process's place in the run. World of one when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down
    device: torch.device = torch.device("cpu")  # where collectives run: NCCL needs CUDA tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor on the input's device; the input is unchanged)."""
        if not self.active:
            return tensor.detach().clone()
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled: small objects only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def main_only(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """Only rank 0 speaks; the others would print the same lines N times."""
        return log if self.is_main else (lambda _msg: None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise DpokitError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device_option: str) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    Without torchrun's WORLD_SIZE this is a world of one and nothing is initialised. An already
    initialised group (dpokit called from the user's own distributed script) is used as it is.
    """
    from dpokit.model.load import resolve_device

    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_option)
    if device.type == "cuda" and device.index is None and "WORLD_SIZE" in os.environ:
        device = torch.device("cuda", local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device=device), device
    if "WORLD_SIZE" not in os.environ:
        return Distributed(device=device), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    return Distributed(rank, world, local_rank, owns_group=True, device=device), device


def teardown(ctx: Distributed) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --- wrapping -----------------------------------------------------------------------------------


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


def parallelize(model: Any, cfg: RunConfig, ctx: Distributed) -> Any:
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
    strategy = cfg.scale.parallel
    if strategy == "fsdp":
        if not ctx.active:
            raise DpokitError("--parallel fsdp needs a torchrun launch (torchrun --nproc-per-node N -m dpokit train ...)")
        return _fully_shard(model, cfg)
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


def _fully_shard(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device
    if cfg.scale.fsdp_cpu_offload and device.type != "cuda":
        raise DpokitError("--fsdp-cpu-offload needs GPUs: it keeps the shards in CPU memory and computes on the GPU")
    offload = CPUOffloadPolicy() if cfg.scale.fsdp_cpu_offload else OffloadPolicy()
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


# --- data ---------------------------------------------------------------------------------------


def rank_steps(order: Sequence[int], batch_size: int, accumulation: int, ctx: Distributed
               ) -> Iterator[tuple[int, list[list[int]]]]:
    """Each optimizer step of an epoch as (pairs in the global step, this rank's micro-batches).

    A global step holds `batch x accumulation x world` pairs (fewer at the end of an epoch);
    rank r takes pairs r, r + world, ... of it. Every rank gets the same number of micro-batches,
    some of them possibly empty, so collectives line up. With a world of one this is plain
    consecutive slicing: pairs [0:B], [B:2B], ...
    """
    world = ctx.world_size
    per_step = batch_size * accumulation * world
    for start in range(0, len(order), per_step):
        step = list(order[start : start + per_step])
        mine = step[ctx.rank :: world]
        most = -(-len(step) // world)  # the largest share any rank has
        count = -(-most // batch_size)
        yield len(step), [mine[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def compute_sharded(count: int, batch_size: int, score: Callable[[list[int]], torch.Tensor],
                    ctx: Distributed) -> torch.Tensor:
    """Score items 0..count-1 split over the ranks; every rank gets all rows back, in item order.

    `score(indices)` returns a (len(indices), K) tensor. Rank r scores items r, r + world, ...;
    every rank runs the same number of batches (one short of items re-scores item 0 and drops
    the result), since FSDP2 forward passes are collectives. For the precomputed reference cache:
    each rank computes its shard once, the cache is assembled from the gathered rows, rank 0
    writes it. (The cache itself lives with the reference strategies; this is its distributed part.)
    """
    if count < 1:
        raise ValueError("compute_sharded needs at least one item")
    mine = list(range(ctx.rank, count, ctx.world_size))
    most = -(-count // ctx.world_size)
    rows = []
    for b in range(-(-most // batch_size)):
        indices = mine[b * batch_size : (b + 1) * batch_size]
        rows.append(score(indices or [0])[: len(indices)].detach())
    local = torch.cat(rows)
    if not ctx.active:
        return local
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded.to(ctx.device))
    full = local.new_empty((count, *local.shape[1:]))
    for r, part in enumerate(gathered):
        full[r :: ctx.world_size] = part[: len(range(r, count, ctx.world_size))].to(full.device)
    return full


# --- state for checkpoints and the final model ---------------------------------------------------


def _state_options(ctx: Distributed, **extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) state gathered to rank 0's CPU memory, so checkpoints look the same for
    # every strategy and world size and can be resumed under another split of the global batch.
    return StateDictOptions(full_state_dict=True, cpu_offload=ctx.active, **extra)


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Parameter names that are a second name for a parameter seen earlier (tied embeddings)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def trainable_state(model: torch.nn.Module, ctx: Distributed) -> dict[str, torch.Tensor]:
    """The full trainable weights on rank 0 (collective under FSDP2). Frozen weights (a LoRA base)
    are left out: they come from --model again on resume. Tied aliases are stored once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(ctx, ignore_frozen_params=True))
    aliases = tied_aliases(model)
    return {k: v.contiguous() for k, v in state.items() if k not in aliases}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], ctx: Distributed) -> None:
    """Inverse of `trainable_state`; every rank passes the full state it read from disk."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, state, options=_state_options(ctx, strict=False))
    frozen = {n for n, p in unwrap(model).named_parameters() if not p.requires_grad}
    missing = set(result.missing_keys) - tied_aliases(model) - frozen
    buffers = {n for n, _ in unwrap(model).named_buffers()}
    missing -= buffers  # persistent buffers are not trained; the loaded model has them already
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not match the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]})")


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Distributed) -> dict:
    """The optimizer state, full and keyed by parameter name (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options(ctx))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         ctx: Distributed) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_state_options(ctx))


def pretrained_state(model: torch.nn.Module, ctx: Distributed) -> dict[str, torch.Tensor] | None:
    """Full weights for `save_pretrained(state_dict=...)` under FSDP2 (gathered, rank 0 only);
    None where `save_pretrained` can read the module itself."""
    if not hasattr(model, "set_requires_gradient_sync"):  # not FSDP2: the module holds full weights
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(ctx))
