"""Pairs -> batch -> policy (and reference) log-probs -> the configured loss.

The loop hands this class lists of TokenizedPairs and gets losses back; how they are batched
(layout) and where reference log-probs come from (a live frozen copy, or none for
reference-free losses) is decided here, once, from the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpokit.config import RunConfig
from dpokit.data import TokenizedPair
from dpokit.data.batching import collate_padded
from dpokit.logprobs import PairLogps, sequence_logps
from dpokit.losses import LossOutput, loss_from_config
from dpokit.metrics import PairMetrics
from dpokit.models import autocast_context


@dataclass
class ScoredBatch:
    out: LossOutput
    policy: PairLogps
    num_tokens: int


class PairScorer:
    def __init__(self, cfg: RunConfig, policy, reference, pad_id: int, device: torch.device):
        self.cfg, self.policy, self.reference = cfg, policy, reference
        self.pad_id, self.device = pad_id, device

    def __call__(self, pairs: Sequence[TokenizedPair]) -> ScoredBatch:
        batch = collate_padded(pairs, self.pad_id).to(self.device)
        with autocast_context(self.device, self.cfg.model.dtype):
            policy = sequence_logps(self.policy, batch)
            reference = None
            if self.reference is not None:
                with torch.no_grad():
                    reference = sequence_logps(self.reference, batch)
        out = loss_from_config(
            self.cfg.loss,
            policy_chosen_logps=policy.chosen_logps,
            policy_rejected_logps=policy.rejected_logps,
            reference_chosen_logps=None if reference is None else reference.chosen_logps,
            reference_rejected_logps=None if reference is None else reference.rejected_logps,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
        )
        return ScoredBatch(out, policy, batch.num_tokens)

    def evaluate(self, pairs: Sequence[TokenizedPair], batch_size: int) -> dict[str, float]:
        """Mean loss, rewards and accuracy on held-out pairs, under TRL's `eval_` names."""
        metrics = PairMetrics()
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                scored = self(pairs[start : start + batch_size])
                metrics.add(scored.out, scored.policy)
        self.policy.train(was_training)
        return metrics.compute(prefix="eval_")
