"""What happened since the last log line: pair metrics, grad norms, tokens, wall time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dpokit.errors import DpokitError
from dpokit.metrics import PairMetrics


class MetricsWindow:
    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta  # scales the tie tolerance of rewards/accuracies
        self.reset()

    def reset(self) -> None:
        self.metrics = PairMetrics(self.beta)
        self.grad_norms: list[torch.Tensor] = []
        self.tokens = 0
        self.steps = 0
        self.learning_rate = 0.0
        self.started = time.perf_counter()
        self.paused_seconds = 0.0  # evaluation and checkpoint time inside the window

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, saving) is not training time: throughput leaves it out."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - began

    def add_step(self, scored_batches, grad_norm: torch.Tensor, learning_rate: float) -> None:
        for scored in scored_batches:
            self.metrics.add(scored.out, scored.policy)
            self.tokens += scored.num_tokens
        self.grad_norms.append(grad_norm.detach())
        self.learning_rate = learning_rate
        self.steps += 1

    def flush(self, step: int, epoch: float,
              sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """One metrics.jsonl record (TRL's names) averaged over the window; resets the window.

        Under torchrun every rank calls this at the same step: `sum_over_ranks` adds up the pair
        sums, pair and token counts of all ranks before the means are taken (one collective).
        Empty dict when no step was recorded since the last flush (every step was skipped).
        """
        if not self.steps:
            return {}
        elapsed = max(time.perf_counter() - self.started - self.paused_seconds, 1e-9)
        if sum_over_ranks is not None:
            self.tokens = self.metrics.merge_across_ranks(sum_over_ranks, extra=self.tokens)
        record = {"step": step, "epoch": round(epoch, 4), **self.metrics.compute()}
        record["grad_norm"] = torch.stack(self.grad_norms).float().mean().item()
        record["learning_rate"] = self.learning_rate
        record["throughput/pairs_per_s"] = self.metrics.pairs / elapsed
        record["throughput/tokens_per_s"] = self.tokens / elapsed
        if torch.cuda.is_available():
            record["memory/peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.reset()
        return record


# logps/*_drift: the logged log-prob minus its first logged value in the run, so chosen log-probs
# falling while the margin grows (DPO's best-known failure) shows as a negative chosen drift.
DRIFTS = {"logps/chosen": "logps/chosen_drift", "logps/rejected": "logps/rejected_drift"}


def add_drift(record: dict, history: list[dict]) -> None:
    """Add the drifts to a training record. The origin is the first record in `history` (the run's
    metrics so far, which a checkpoint restores) that holds the log-probs, else this record: with
    --log-every 1 that is the first batch, scored before the first update."""
    origin = next((r for r in history if "logps/chosen" in r), record)
    for name, drift in DRIFTS.items():
        record[drift] = record[name] - origin[name]


def check_finite_record(record: dict, step: int) -> None:
    """A logged mean can only be non-finite if a per-pair value overflowed; never log it silently."""
    for name in ("loss", "grad_norm"):
        if not math.isfinite(record[name]):
            raise DpokitError(f"step {step}: logged {name} is {record[name]}; lower --learning-rate or check the data")


def describe(record: dict) -> str:
    keys = [k for k in record if "loss" in k or "accuracies" in k or "margins" in k]
    return ", ".join(f"{k} {record[k]:.4f}" for k in keys)
