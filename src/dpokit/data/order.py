"""The order pairs are visited in: a seeded permutation per epoch, so a run is reproducible and a
resumed run visits the remaining pairs exactly as the uninterrupted one would."""

from __future__ import annotations

import torch


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """A permutation of the pairs that depends only on (seed, epoch): reproducible and resumable."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()
