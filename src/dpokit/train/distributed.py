"""This process's place in a torchrun launch: the process group and the few collectives the loop needs.

`torchrun --nproc-per-node N -m dpokit train ...` starts N processes; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) tells each one who it is. `Distributed` holds
that and the collectives; with no torchrun it is a world of one whose collectives return their
input, so a single-process run takes the very same code path. How the model is wrapped is in
train/wrap.py, how each step's pairs are split over the ranks in train/shards.py, how the full
state is gathered for checkpoints in train/state.py.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.model.load import resolve_device


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

    def main_only(self, log: Log) -> Log:
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
        # The group lives on while anything holds it (FSDP2's device mesh, in the model's reference
        # cycles). Left to the interpreter's exit, its Gloo threads may still be freeing a finished
        # collective's tensors, which takes the GIL the exiting interpreter refuses: an abort after a
        # complete run (seen about one FSDP2 run in five under the test suite). Collected here, the
        # group is freed while Python lives, and its destructor joins those threads without the GIL.
        gc.collect()

