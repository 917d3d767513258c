"""Training metrics under TRL's names, accumulated as tensors and read to the host only to log."""

from __future__ import annotations

import torch

from dpokit.logprobs import PairLogps
from dpokit.losses import LossOutput

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


class PairMetrics:
    """Sums per-pair quantities over any number of batches; `compute()` gives their means."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None
        self.pairs = 0

    def add(self, out: LossOutput, logps: PairLogps) -> None:
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        # The log-probs the loss saw: length-averaged for the losses that average, else the sums.
        chosen_logps = out.chosen_logps if out.chosen_logps is not None else logps.chosen_logps
        rejected_logps = out.rejected_logps if out.rejected_logps is not None else logps.rejected_logps
        per_pair = torch.stack(
            [
                out.losses.detach().float(),
                chosen.float(),
                rejected.float(),
                (chosen - rejected).float(),
                (chosen > rejected).float(),
                chosen_logps.detach().float(),
                rejected_logps.detach().float(),
            ]
        ).sum(dim=1)
        self._sums = per_pair if self._sums is None else self._sums + per_pair
        self.pairs += out.losses.shape[0]

    def merge_across_ranks(self, sum_over_ranks, extra: int = 0) -> int:
        """Replace this rank's sums and pair count by those of all ranks; `extra` (a count such as
        tokens) rides along in the same collective and its total is returned."""
        sums = self._sums if self._sums is not None else torch.zeros(len(PAIR_METRICS))
        # float64: token counts stay exact far past float32's 2**24
        packed = torch.cat([sums.double().cpu(), torch.tensor([self.pairs, extra], dtype=torch.float64)])
        total = sum_over_ranks(packed)
        self._sums, self.pairs = total[: len(PAIR_METRICS)], int(total[-2].item())
        return int(total[-1].item())

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Means over all pairs added; one host sync."""
        if self._sums is None:
            return {}
        means = (self._sums / self.pairs).tolist()
        return {prefix + name: value for name, value in zip(PAIR_METRICS, means, strict=True)}
