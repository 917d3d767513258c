"""Forward pass -> per-sequence summed response log-probs. The one log-prob path of dpokit.

log p(token) is computed as `logit[token] - logsumexp(logits)` on the response positions only,
in float32 chunks, so no float32 `log_softmax` over `[rows, tokens, vocab]` is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.data.batching import PairBatch

# Response positions scored per chunk: bounds the float32 temporaries to CHUNK x vocab.
CHUNK_POSITIONS = 1024


@dataclass
class PairLogps:
    """(B,) tensors: summed response log-probs and response token counts of each half."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits and (N,) targets -> (N,) float32 log-probs, chunked over N."""
    pieces = []
    for start in range(0, logits.shape[0], CHUNK_POSITIONS):
        chunk = logits[start : start + CHUNK_POSITIONS].float()
        picked = chunk.gather(-1, targets[start : start + CHUNK_POSITIONS, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    if not pieces:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> PairLogps:
    """Run `model` on the batch's 2B rows and sum each row's response-token log-probs."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    # The logit at position t predicts the token at t + 1.
    scored = batch.response_mask[:, 1:]
    rows, positions = scored.nonzero(as_tuple=True)
    targets = batch.input_ids[:, 1:][rows, positions]
    logps = token_logps(logits[rows, positions], targets)

    num_rows = batch.input_ids.shape[0]
    summed = torch.zeros(num_rows, dtype=torch.float32, device=logps.device).index_add(0, rows, logps)
    lengths = scored.sum(dim=1).to(torch.float32)
    b = batch.num_pairs
    return PairLogps(summed[:b], summed[b:], lengths[:b], lengths[b:])
