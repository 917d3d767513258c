"""The DPO loss family as pure functions over per-sequence log-probs, and their registry.

Every function takes (B,) tensors of *summed* response log-probs and returns per-example
losses and implicit rewards. Nothing here knows about models, batches or layouts: whatever
layout produced the log-probs, the math lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.errors import DpokitError


@dataclass(frozen=True)
class LossOutput:
    """Per-example tensors, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """A registry entry: the function and what it needs from the trainer."""

    fn: Callable[..., LossOutput]
    needs_reference: bool
    doc: str


def _sigmoid(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    **_: object,
) -> LossOutput:
    """DPO, Rafailov et al. 2023, eq. 7: -log σ(βΔ); ε > 0 gives conservative DPO (cDPO)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, needs_reference=True, doc=_sigmoid.__doc__ or ""),
}
LOSSES["dpo"] = LOSSES["sigmoid"]


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name, with a one-line error listing the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise DpokitError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}") from None


def preference_loss(name: str, **tensors_and_options: object) -> LossOutput:
    """Compute the named loss; see each registry entry's docstring for its equation."""
    return get_loss(name).fn(**tensors_and_options)


def needs_reference(loss_config) -> bool:
    """Whether any loss in the run's configuration needs reference log-probs."""
    return get_loss(loss_config.loss).needs_reference


def check_loss_config(loss_config) -> None:
    """Reject, before any model is loaded, a loss configuration that cannot work."""
    get_loss(loss_config.loss)


def loss_from_config(loss_config, **tensors: torch.Tensor) -> LossOutput:
    """The run's loss (a `LossConfig`) on one batch's (B,) log-prob and length tensors."""
    return preference_loss(
        loss_config.loss, beta=loss_config.beta, label_smoothing=loss_config.label_smoothing, **tensors
    )
