"""Each rank's share of the work: the pairs of every optimizer step, and sharded scoring.

How a step is split (the loop does not branch on the strategy):
- Each optimizer step takes `batch x accumulation x world` pairs from the shared seeded epoch
  order; rank r takes every world-th of them (`rank_steps`), so ranks see disjoint pairs.
- Every rank runs the same number of micro-batches (a rank short of pairs runs a stand-in
  micro-batch whose loss is multiplied by 0): DDP and FSDP2 need every rank in every collective.
- DDP and FSDP2 both *average* gradients over ranks, so each rank scales its summed loss by
  `world / pairs in the global step`: the average of those is the global sum / global count,
  the same update as one process with the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import torch
import torch.distributed as dist

from dpokit.data.order import epoch_order
from dpokit.train.distributed import Distributed


def rank_steps(order: Sequence[int], batch_size: int, accumulation: int, ctx: Distributed
               ) -> Iterator[tuple[int, list[list[int]]]]:
    """Each optimizer step of an epoch as (pairs in the global step, this rank's micro-batches).

    A global step holds `batch x accumulation x world` pairs (fewer at the end of an epoch);
    rank r takes pairs r, r + world, ... of it. Every rank gets the same number of micro-batches,
    some of them possibly empty, so collectives line up. With a world of one this is plain
    consecutive slicing: pairs [0:B], [B:2B], ...
    """
    world = ctx.world_size
    per_step = batch_size * accumulation * world
    for start in range(0, len(order), per_step):
        step = list(order[start : start + per_step])
        mine = step[ctx.rank :: world]
        most = -(-len(step) // world)  # the largest share any rank has
        count = -(-most // batch_size)
        yield len(step), [mine[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def pairs_the_run_uses(num_pairs: int, seed: int, total_steps: int, batch_size: int, accumulation: int,
                       ctx: Distributed) -> list[int] | None:
    """Indices of the training pairs the run's `total_steps` steps will score, by the same seeded
    order and split as the loop (with each epoch's stand-in pair); None when that is all of them."""
    used: set[int] = set()
    steps_left, epoch = total_steps, 0
    while steps_left > 0 and len(used) < num_pairs:
        order = epoch_order(num_pairs, seed, epoch)
        used.add(order[0])  # the stand-in a rank short of pairs scores at weight 0
        for _, micro_batches in islice(rank_steps(order, batch_size, accumulation, ctx), steps_left):
            used.update(i for indices in micro_batches for i in indices)
            steps_left -= 1
        epoch += 1
    return None if len(used) == num_pairs else sorted(used)


def compute_sharded(count: int, batch_size: int, score: Callable[[list[int]], torch.Tensor],
                    ctx: Distributed) -> torch.Tensor:
    """Score items 0..count-1 split over the ranks; every rank gets all rows back, in item order.

    `score(indices)` returns a (len(indices), K) tensor. Rank r scores items r, r + world, ...;
    every rank runs the same number of batches (one short of items re-scores item 0 and drops
    the result), since FSDP2 forward passes are collectives. Meant for the precomputed reference
    cache under torchrun (each rank scores its shard once, every rank gets the gathered rows);
    not wired in yet: torchrun runs use a live reference (`scoring.uses_live_reference`).
    """
    if count < 1:
        raise ValueError("compute_sharded needs at least one item")
    mine = list(range(ctx.rank, count, ctx.world_size))
    most = -(-count // ctx.world_size)
    rows = []
    for b in range(-(-most // batch_size)):
        indices = mine[b * batch_size : (b + 1) * batch_size]
        rows.append(score(indices or [0])[: len(indices)].detach())
    local = torch.cat(rows)
    if not ctx.active:
        return local
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded.to(ctx.device))
    full = local.new_empty((count, *local.shape[1:]))
    for r, part in enumerate(gathered):
        full[r :: ctx.world_size] = part[: len(range(r, count, ctx.world_size))].to(full.device)
    return full
