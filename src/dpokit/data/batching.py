"""TokenizedPairs -> model batches, and the seeded order they are visited in.

Layout `padded`: a batch of B pairs is 2B right-padded rows, the B chosen sequences first and
the B rejected ones after, so one forward pass serves both halves of every pair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dpokit.data.tokenize import TokenizedPair


@dataclass
class PairBatch:
    """Tensors for one forward pass over B pairs (2B rows of length T).

    input_ids:      (2B, T) token ids, right-padded
    attention_mask: (2B, T) 1 on real tokens
    response_mask:  (2B, T) 1 on response tokens (the ones scored), 0 on prompt and padding
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    num_pairs: int
    num_tokens: int

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.response_mask.to(device, non_blocking=True),
            self.num_pairs,
            self.num_tokens,
        )


def collate_padded(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Stack chosen rows then rejected rows, each as prompt + response, right-padded."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, n_prompt:n] = True
    num_tokens = int(attention_mask.sum())
    return PairBatch(input_ids, attention_mask, response_mask, len(pairs), num_tokens)


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """A permutation of the pairs that depends only on (seed, epoch): reproducible and resumable."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def step_batches(
    order: Sequence[int], batch_size: int, accumulation: int
) -> Iterator[list[list[int]]]:
    """Group an epoch's order into optimizer steps of `accumulation` micro-batches of indices.

    The last step of an epoch may hold fewer pairs; the loop normalises by the pairs it holds.
    """
    per_step = batch_size * accumulation
    for start in range(0, len(order), per_step):
        chunk = order[start : start + per_step]
        yield [list(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
