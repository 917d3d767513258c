"""Training metrics under TRL's names and with TRL 1.16's meaning, accumulated as tensors and read
to the host only to log: `rewards/*` on summed log-ratios (every loss with a reference), `logps/*`
the summed response log-probs (every loss)."""

from __future__ import annotations

import torch

from dpokit.logratios import LossOutput
from dpokit.model.logprobs import PairLogps
from dpokit.model.router_loss import ROUTER_METRICS, router_metric_rows

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
# Under --wpo: the mean pair weight w_c·w_r (WPO), logged only by runs that weight their pairs.
WPO_METRIC = "wpo/pair_weight"
# For the losses that length-average (IPO, sigmoid_norm): β(lr_c/len_c − lr_r/len_r), what they act
# on (IPO's target is 1/2); rewards/margins stays TRL's, on the sums. Logged only by those runs.
PER_TOKEN_METRIC = "rewards/margins_per_token"
OPTIONAL_METRICS = (WPO_METRIC, PER_TOKEN_METRIC)


# Ties. Two passes of the same weights over the same pair (the policy against its reference at the
# first step, or against the cached reference computed in another batch layout) agree only up to
# float32 rounding: each summed log-prob carries an error of a few units of roundoff u = 2**-24
# times its magnitude (measured: at most 3 u across layouts, batch sizes and LM-head paths on the
# tiny test model and the demo model). A margin within 64 u of the magnitudes of the four
# log-probs of the pair (policy and reference, taken as twice the policy's) is a tie, not a win;
# as in TRL, a tie does not count toward rewards/accuracies, so training starts from 0.
# Under bf16/fp16 autocast the logits themselves are rounded more coarsely, and step-1 noise can
# exceed this float32 tolerance.
TIE_ROUNDOFF_UNITS = 64
FLOAT32_ROUNDOFF = 2.0**-24


def tie_tolerance(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) largest |reward margin| that float32 rounding of the log-probs alone can produce
    (the log-probs the rewards are β times: summed, or per token for the reference-free losses)."""
    magnitude = 2 * (chosen_logps.detach().abs() + rejected_logps.detach().abs())
    return beta * TIE_ROUNDOFF_UNITS * FLOAT32_ROUNDOFF * magnitude.float()


class PairMetrics:
    """Sums per-pair quantities over any number of batches; `compute()` gives their means.

    `beta` scales the tie tolerance (rewards are β times log-ratios): see TIE_ROUNDOFF_UNITS.
    """

    def __init__(self, beta: float = 1.0) -> None:
        self._sums: torch.Tensor | None = None
        self.pairs = 0
        self.beta = beta
        # Which optional metrics the pairs carried (the same on every rank: one config).
        self.has = dict.fromkeys(OPTIONAL_METRICS, False)
        self.routed = False  # whether the batches carried the MoE router's figures (likewise)

    def add(self, out: LossOutput, logps: PairLogps) -> None:
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        # The log-probs the rewards are β times: the summed ones, or per token for reference-free losses.
        basis = out.reward_logps or (logps.chosen_logps, logps.rejected_logps)
        wins = (chosen - rejected).float() > tie_tolerance(*basis, self.beta)
        optional = {WPO_METRIC: logps.pair_weights, PER_TOKEN_METRIC: out.margins_per_token}
        per_pair = torch.stack(
            [
                out.losses.detach().float(),
                chosen.float(),
                rejected.float(),
                (chosen - rejected).float(),
                wins.float(),
                logps.chosen_logps.detach().float(),
                logps.rejected_logps.detach().float(),
                *(torch.zeros_like(wins.float()) if value is None else value.detach().float()
                  for value in optional.values()),
                *router_metric_rows(logps.router, wins.float()),
            ]
        ).sum(dim=1)
        for name, value in optional.items():
            self.has[name] = self.has[name] or value is not None
        self.routed = self.routed or logps.router is not None
        self._sums = per_pair if self._sums is None else self._sums + per_pair
        self.pairs += out.losses.shape[0]

    def merge_across_ranks(self, sum_over_ranks, extra: int = 0) -> int:
        """Replace this rank's sums and pair count by those of all ranks; `extra` (a count such as
        tokens) rides along in the same collective and its total is returned."""
        sums = self._sums if self._sums is not None else torch.zeros(len(PAIR_METRICS) + len(OPTIONAL_METRICS) + len(ROUTER_METRICS))
        # float64: token counts stay exact far past float32's 2**24
        packed = torch.cat([sums.double().cpu(), torch.tensor([self.pairs, extra], dtype=torch.float64)])
        total = sum_over_ranks(packed)
        self._sums, self.pairs = total[:-2], int(total[-2].item())
        return int(total[-1].item())

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Means over all pairs added; one host sync."""
        if self._sums is None:
            return {}
        means = (self._sums / self.pairs).tolist()
        names = (*PAIR_METRICS, *OPTIONAL_METRICS, *ROUTER_METRICS)
        return {prefix + name: value for name, value in zip(names, means, strict=True)
                if name in PAIR_METRICS or self.has.get(name, self.routed)}  # router rows: self.routed
