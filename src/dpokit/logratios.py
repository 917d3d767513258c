"""What every loss reads: the run's frozen options and one batch's log-ratios, computed once.

As in the DPO paper's reference code, the shared quantities (policy and reference log-ratios,
their f-divergence scores, `logits` = Δ on scores, the implicit rewards) are computed once per
batch, here, so each loss in `dpokit.losses` is one or two lines over them. Shapes: every
tensor is (B,), one entry per pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from dpokit.config import F_DIVERGENCES, LossConfig
from dpokit.errors import DpokitError

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossOptions:
    """The loss options of one run, frozen; their defaults are LossConfig's (the one copy)."""

    beta: float
    label_smoothing: float
    f_divergence: str
    alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    orpo_lambda: float
    rdpo_alpha: float
    dpop_lambda: float
    beta_dpo_alpha: float
    beta_dpo_rho: float

    @classmethod
    def from_config(cls, loss_config: LossConfig) -> LossOptions:
        return cls(**{f.name: getattr(loss_config, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class LossOutput:
    """Per-example tensors, each of shape (B,).

    Rewards are TRL 1.16's: β·lr on the summed log-ratios for every loss with a reference, IPO and
    sigmoid_norm included (they act on length-averaged ones, but report the sums, as TRL does).
    Reference-free losses (no log-ratio exists) report β·π/len, the implicit reward of SimPO and of
    TRL's CPO and ORPO trainers; `reward_logps` then holds the per-token log-probs π/len those
    rewards are β times (None: the rewards are on summed log-probs), for the tie tolerance.
    `margins_per_token`, for the losses that length-average: β(lr_c/len_c − lr_r/len_r), what they act on.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reward_logps: tuple[Tensor, Tensor] | None = None
    margins_per_token: Tensor | None = None


@dataclass(frozen=True)
class PairLogRatios:
    """One batch's log-probs (each (B,)) and the quantities losses share, each computed once on
    first use. Reference log-probs may be None for reference-free losses, lengths for losses
    that do not read them."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor | None
    reference_rejected_logps: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    options: LossOptions
    running_margin: Tensor | None = None  # M0 of β-DPO, this batch included (RunningMargin), else None

    @cached_property
    def chosen_logratios(self) -> Tensor:  # lr_c
        return self.policy_chosen_logps - self.reference_chosen_logps

    @cached_property
    def rejected_logratios(self) -> Tensor:  # lr_r
        return self.policy_rejected_logps - self.reference_rejected_logps

    @cached_property
    def chosen_scores(self) -> Tensor:
        return score_logratios(self.chosen_logratios, self.options)

    @cached_property
    def rejected_scores(self) -> Tensor:
        return score_logratios(self.rejected_logratios, self.options)

    @cached_property
    def logits(self) -> Tensor:
        """Δ on scores (lr_c − lr_r under reverse KL): β times this is DPO's sigmoid argument."""
        return self.chosen_scores - self.rejected_scores

    @cached_property
    def averaged_logits(self) -> Tensor:
        """Δ on length-averaged scores: score_c/len_c − score_r/len_r (IPO, sigmoid_norm)."""
        chosen = length_average(self.chosen_scores, self.chosen_lengths)
        return chosen - length_average(self.rejected_scores, self.rejected_lengths)

    @cached_property
    def rewards(self) -> tuple[Tensor, Tensor]:
        """(β·lr_c, β·lr_r), detached: the implicit rewards of reference-based losses."""
        beta = self.options.beta
        return beta * self.chosen_logratios.detach(), beta * self.rejected_logratios.detach()

    @cached_property
    def averaged_logps(self) -> tuple[Tensor, Tensor]:
        """(π_c/len_c, π_r/len_r): the per-token policy log-probs."""
        return (length_average(self.policy_chosen_logps, self.chosen_lengths),
                length_average(self.policy_rejected_logps, self.rejected_lengths))

    def averaged_output(self, losses: Tensor) -> LossOutput:
        """A length-averaging loss's output: TRL's rewards β·lr on the sums, and the per-token margin it acts on."""
        per_token = length_average(self.chosen_logratios, self.chosen_lengths) - length_average(
            self.rejected_logratios, self.rejected_lengths)
        return LossOutput(losses, *self.rewards, margins_per_token=self.options.beta * per_token.detach())

    def reference_free_output(self, losses: Tensor) -> LossOutput:
        """Rewards β·π/len on the per-token log-probs π/len that reference-free losses see."""
        beta, avg_c, avg_r = self.options.beta, *self.averaged_logps
        return LossOutput(losses, beta * avg_c.detach(), beta * avg_r.detach(), (avg_c.detach(), avg_r.detach()))


class RunningMargin:
    """β-DPO's M0: a moving average of the training batches' mean margin Δ = lr_c − lr_r (momentum
    0.9, as the authors' code; started at the first batch's mean rather than 0, so the first batches
    are not judged against a margin nobody measured). Only passes that train (gradients on) move it;
    evaluations read it. A tensor on the batch's device, so updating it never syncs with the host;
    `state_dict` goes into the checkpoint so a resumed run continues from the same M0."""

    MOMENTUM = 0.9

    def __init__(self) -> None:
        self.mean: Tensor | None = None

    def update(self, margins: Tensor) -> Tensor:
        """M0 with this batch's (detached) margins folded in; stored only when training."""
        batch_mean = margins.detach().mean()
        if self.mean is None:
            mean = batch_mean
        else:  # a restored M0 lives on the CPU until the first batch
            mean = self.MOMENTUM * self.mean.to(batch_mean.device) + (1 - self.MOMENTUM) * batch_mean
        if torch.is_grad_enabled():
            self.mean = mean
        return mean

    def state_dict(self) -> dict[str, float | str]:
        """JSON-ready; the value and its dtype exactly (a float32 M0 is exact as a Python float)."""
        if self.mean is None:
            return {}
        return {"running_margin": float(self.mean), "dtype": str(self.mean.dtype).removeprefix("torch.")}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.mean = torch.tensor(state["running_margin"], dtype=getattr(torch, state["dtype"])) if state else None


def score_logratios(logratios: Tensor, options: LossOptions) -> Tensor:
    """f'(π/ref) of f-DPO (Wang et al. 2023, Table 1), written in log-ratios as TRL 1.16 does."""
    f_divergence = options.f_divergence
    if f_divergence == "reverse_kl":  # f'(t) = log t + 1; the constant cancels in Δ
        return logratios
    if f_divergence == "forward_kl":  # f'(t) = 1 − 1/t: the α-divergence's f' at α = 0
        return _power_score(logratios, 0.0)
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":  # f'(t) = (t^(α−1) − 1) / (α − 1); reverse KL at α = 1
        a = options.alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        return _power_score(logratios, a)
    raise DpokitError(f"--f-divergence must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence!r}")


def _power_score(logratios: Tensor, a: float) -> Tensor:
    """(t^(a−1) − 1) / (a − 1) with t = exp(logratio), a ≠ 1. The exponent is clamped so exp() stays
    finite (fp16/bf16 computed in fp32, as TRL does): an extreme log-ratio (−106 nats under forward
    KL) gives a huge finite score, never inf, so the losses built on it never meet inf − inf or 0·inf."""
    work = logratios.float() if logratios.dtype in (torch.float16, torch.bfloat16) else logratios
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0 if work.dtype == torch.float32 else 700.0
    t = torch.clamp((a - 1.0) * work, max=clamp_max)
    return (torch.expm1(t) / (a - 1.0)).to(logratios.dtype)


def length_average(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-averaged log-prob; counts below 1 count as 1 (an empty response has log-prob 0)."""
    return logps / lengths.clamp(min=1.0)
