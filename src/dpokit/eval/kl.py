"""KL(π ‖ π_ref) from the policy's own samples, and the statistics the evaluation figures share.

`kl_estimate`: the mean over samples y ~ π(·|x) of log π(y|x) − log π_ref(y|x), with its standard
error. Log-probs come from the one log-prob path, `dpokit.model.logprobs.sequence_logps`, each
completion scored as it was sampled (its token ids, its stop token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dpokit.data import TokenizedPair
from dpokit.data.batching import PairBatch, collate_padded
from dpokit.eval.sampling import Completion, SampleSet
from dpokit.model.load import autocast_context
from dpokit.model.logprobs import sequence_logps


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s / √n (s with n − 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)



def _rows_batch(rows: Sequence[Completion], pad_id: int) -> PairBatch:
    """Completions as the chosen halves of a padded pair batch, so the one log-prob path scores
    them; each rejected half is a one-token stand-in, nearly free, that the caller ignores."""
    pairs = [TokenizedPair(tuple(r.prompt_ids), tuple(r.response_ids), tuple(r.response_ids[:1]), index=i)
             for i, r in enumerate(rows)]
    return collate_padded(pairs, pad_id)


@torch.no_grad()
def completion_logps(model, completions: Sequence[Completion], *, pad_id: int, batch_size: int = 16,
                     dtype: str = "fp32") -> list[float]:
    """Summed log-prob of each completion's response tokens (EOS included when generated)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(completions), batch_size):
            chunk = completions[start:start + batch_size]
            batch = _rows_batch(chunk, pad_id).to(device)
            with autocast_context(device, dtype):
                logps = sequence_logps(model, batch)
            out.extend(logps.chosen_logps.tolist())
    finally:
        model.train(was_training)
    return out


def kl_estimate(policy, reference, policy_samples: SampleSet, *, pad_id: int, batch_size: int = 16,
                dtype: str = "fp32") -> dict:
    """KL(π ‖ π_ref) from samples of π: mean of log π(y|x) − log π_ref(y|x), with standard error.

    Unbiased only when the samples were drawn from π itself (temperature 1, no top-p/top-k);
    responses cut at max_new_tokens make it the KL of the first max_new_tokens tokens.
    """
    return _kl_and_log_ratios(policy, reference, policy_samples, pad_id=pad_id, batch_size=batch_size,
                              dtype=dtype)[0]


def _kl_and_log_ratios(policy, reference, policy_samples: SampleSet, *, pad_id: int, batch_size: int,
                       dtype: str) -> tuple[dict, list[float]]:
    """`kl_estimate`'s figures, and each sample's log-ratio (prompt by prompt, in sample order)."""
    flat = [c for per in policy_samples.completions for c in per]
    policy_logps = completion_logps(policy, flat, pad_id=pad_id, batch_size=batch_size, dtype=dtype)
    reference_logps = completion_logps(reference, flat, pad_id=pad_id, batch_size=batch_size, dtype=dtype)
    log_ratios = [p - r for p, r in zip(policy_logps, reference_logps, strict=True)]
    kl, stderr = mean_and_stderr(log_ratios)
    return {"kl": kl, "kl_stderr": stderr, "sequences": len(flat),
            "unfinished_fraction": sum(not c.finished for c in flat) / len(flat),
            "logp_policy": sum(policy_logps) / len(flat), "logp_reference": sum(reference_logps) / len(flat),
            "response_tokens": sum(len(c.response_ids) for c in flat) / len(flat)}, log_ratios


def _per_prompt_means(values: Sequence[float], samples: SampleSet) -> list[float]:
    """`values`, one per sample in `samples`' order, averaged prompt by prompt."""
    means, start = [], 0
    for per in samples.completions:
        means.append(sum(values[start:start + len(per)]) / len(per))
        start += len(per)
    return means
