"""Run under torchrun (2 ranks, gloo): compute_sharded returns every row, in order, on every rank."""

import sys

import torch

from dpokit.train.distributed import init_distributed, teardown
from dpokit.train.shards import compute_sharded

calls = []


def score(indices):
    calls.append(list(indices))
    return torch.tensor([[i * 10.0, -i] for i in indices])


ctx, _ = init_distributed("cpu")
try:
    for count in map(int, sys.argv[1:]):
        calls.clear()
        full = compute_sharded(count, 2, score, ctx)
        expected = torch.tensor([[i * 10.0, -i] for i in range(count)])
        assert torch.equal(full, expected), full
        scored = {i for batch in calls for i in batch}
        assert scored - {0} <= set(range(ctx.rank, count, ctx.world_size)), (ctx.rank, calls)  # its shard only
        print(f"rank {ctx.rank} count {count} ok: {len(calls)} batches")
finally:
    teardown(ctx)
