"""One optimizer step: forward and backward over this rank's micro-batches (gradients
accumulated), the finiteness check, clip, optimizer step, schedule.

Host syncs: the step body reads the device once, both finiteness flags in one transfer, which
must precede the update. The others a step can have are not in this code: the fp16 loss
scaler's own inf check inside `scaler.step` (fp16 only), the stop-signal agreement the loop
makes under torchrun, and whatever the model's forward does (transformers checks a padded
batch's attention mask on the host). Metrics stay on the device until a log line is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.config import TrainConfig
from dpokit.data import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.scoring import PairScorer, ScoredBatch
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.distributed import Distributed
from dpokit.train.wrap import clip_grad_norm, gradient_sync


@dataclass
class TrainingParts:
    """What a step updates: the (wrapped) policy, its optimizer, schedule and loss scaler."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[torch.Tensor]  # the trainable ones, clipped together


@dataclass
class StepOutcome:
    loss: torch.Tensor  # () the step's loss (sum over its pairs / their count), averaged over ranks
    grad_norm: torch.Tensor  # () before clipping
    scored: list[ScoredBatch]  # this rank's micro-batches that held pairs, for the metrics
    learning_rate: float  # the one this step used
    finite: bool  # loss and gradient finite: the step counts in the metrics
    scaler_skipped: bool  # fp16 gradient overflow: the loss scaler skipped the step and lowered its scale
    skipped_nonfinite: bool  # skipped under --skip-nonfinite


def train_step(parts: TrainingParts, scorer: PairScorer, micro_batches: Sequence[Sequence[TokenizedPair]],
               stand_in: TokenizedPair, *, pairs_in_step: int, train: TrainConfig, ctx: Distributed, step: int,
               output: Path, log: Log) -> StepOutcome:
    """Optimizer step number `step` over this rank's `micro_batches` (some possibly empty) of a
    global step of `pairs_in_step` pairs. A non-finite loss or gradient stops the run before the
    update (naming the last good checkpoint), or skips the step under --skip-nonfinite."""
    scored, loss = _forward_backward(parts, scorer, micro_batches, stand_in, pairs_in_step, ctx)
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = clip_grad_norm(parts.params, train.max_grad_norm)
    # The step's one host read, before the update: both flags in one transfer.
    loss_finite, grad_finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm).to(loss.device)]).tolist()
    # Under fp16 an overflowing gradient is routine: the scaler skips the step and lowers its scale.
    scaler_skips = loss_finite and not grad_finite and parts.scaler.is_enabled()
    outcome = StepOutcome(loss, grad_norm, scored, parts.scheduler.get_last_lr()[0], finite=loss_finite and grad_finite,
                          scaler_skipped=scaler_skips, skipped_nonfinite=False)
    if loss_finite and (grad_finite or scaler_skips):
        parts.scaler.step(parts.optimizer)
    else:
        _handle_nonfinite(train.skip_nonfinite, step, loss, grad_norm, output, log)
        outcome.skipped_nonfinite = True
    parts.scaler.update()
    _advance_schedule(parts.scheduler)
    parts.optimizer.zero_grad(set_to_none=True)
    return outcome


def _forward_backward(parts: TrainingParts, scorer: PairScorer, micro_batches: Sequence[Sequence[TokenizedPair]],
                      stand_in: TokenizedPair, pairs_in_step: int, ctx: Distributed
                      ) -> tuple[list[ScoredBatch], torch.Tensor]:
    """Gradients of the step's loss accumulated over the micro-batches; the loss, averaged over ranks."""
    # Sum over the step's pairs / their count, so accumulation never changes the update;
    # x world because DDP and FSDP2 average gradients over ranks (sum = world x mean).
    loss_scale = ctx.world_size / pairs_in_step
    scored_batches, step_loss = [], torch.zeros((), device=scorer.device)
    for n, pairs in enumerate(micro_batches):
        with gradient_sync(parts.policy, enabled=n == len(micro_batches) - 1):
            # A rank short of pairs scores a stand-in pair at weight 0: every rank must
            # join every forward and backward, or the collectives inside them hang.
            weight = 1.0 if pairs else 0.0
            scored = scorer(list(pairs) or [stand_in])
            loss = scored.out.losses.sum() * (loss_scale * weight)
            parts.scaler.scale(loss).backward()
        step_loss += loss.detach()
        if pairs:
            scored_batches.append(scored)
    # Ranks must agree on finiteness, or one waits forever for the others.
    return scored_batches, ctx.sum(step_loss) / ctx.world_size


def _advance_schedule(scheduler) -> None:
    """One schedule step per optimizer step, taken or skipped: the learning rate follows the step count
    (so a resumed run is exact). PyTorch warns when the first optimizer step was skipped; that is this
    deliberate choice, not a mistake to show users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _handle_nonfinite(skip: bool, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, output: Path,
                      log: Log) -> None:
    # Name what is non-finite: a finite loss with an overflowing gradient calls for other remedies.
    if torch.isfinite(loss):
        what = f"gradient (norm {grad_norm.item()}; the loss {loss.item():.6g} is finite)"
    else:
        what = f"loss {loss.item()}, gradient norm {grad_norm.item()}"
    if skip:
        log(f"step {step}: non-finite {what}; step skipped (--skip-nonfinite)")
        return
    found = list_checkpoints(output)
    last_good = f"; the last good checkpoint is {found[-1]} (--resume auto)" if found else ""
    raise DpokitError(
        f"step {step}: non-finite {what}; stopped before updating the weights{last_good}. "
        "Lower --learning-rate, check the data, or pass --skip-nonfinite"
    )
