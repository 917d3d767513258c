"""Full (unsharded) model and optimizer state, for checkpoints and the final model.

Gathered to rank 0's CPU memory under FSDP2 (a collective every rank joins), so checkpoints look
the same for every strategy and world size and can be resumed under another split of the
global batch.
"""

from __future__ import annotations

from typing import Any

import torch

from dpokit.train.distributed import Distributed
from dpokit.train.wrap import unwrap


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
