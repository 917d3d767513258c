"""TokenizedPairs -> model batches in one of three layouts (the order pairs are visited in: `data/order.py`).

Every layout describes the same 2B sequences (pair i's chosen is sequence i, its rejected is
sequence B + i) and ends in the same scoring spec: the hidden state at (score_rows, score_cols)
predicts token `targets`, which belongs to sequence `score_seq`. `logprobs.sequence_logps`
reads only that spec, so every layout yields the same per-sequence log-probs.

- `padded`: 2B right-padded rows, chosen rows first; a 2D padding mask, default positions.
- `packed` (padding-free): the 2B sequences are blocks packed first-fit-decreasing into rows;
  position ids restart at 0 in every block, and attention never crosses a block.
- `prefix-shared`: one block per pair, prompt + chosen + rejected; rejected tokens attend to
  the prompt but not to chosen, and take the positions an unshared forward gives them
  (len(prompt) + k). Blocks are packed into rows like `packed`. The prompt is computed once.

Packed and prefix-shared rows describe attention with `segment_ids` (which block a token is in)
and `branch_ids` (0 = visible to the whole block, 1 = chosen, 2 = rejected);
`attention.attention_inputs` turns them into the mask form the model's attention wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpokit.config import BATCH_LAYOUTS as LAYOUTS
from dpokit.data.tokenize import TokenizedPair

SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PairBatch:
    """Tensors for one forward pass over B pairs (R rows of length T) and what to score.

    input_ids:      (R, T) token ids, right-padded
    attention_mask: (R, T) 1 on real tokens (padded layout); None for packed layouts
    position_ids:   (R, T) position of each token in its own sequence; None = 0..T-1 (padded)
    segment_ids:    (R, T) block of each token (-1 on padding); None for padded
    branch_ids:     (R, T) SHARED, CHOSEN or REJECTED; None for padded
    score_rows, score_cols: (N,) the hidden state there predicts the n-th scored token
    targets:        (N,) the scored token ids
    score_seq:      (N,) sequence of each scored token: i = pair i chosen, B + i = pair i rejected
    num_tokens:     real (non-padding) tokens that go through the model
    """

    layout: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    segment_ids: torch.Tensor | None
    branch_ids: torch.Tensor | None
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    targets: torch.Tensor
    score_seq: torch.Tensor
    num_pairs: int
    num_tokens: int

    def to(self, device: torch.device | str) -> PairBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return PairBatch(
            self.layout, *(move(getattr(self, n)) for n in _TENSOR_FIELDS), self.num_pairs, self.num_tokens
        )


_TENSOR_FIELDS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "branch_ids", "score_rows",
                  "score_cols", "targets", "score_seq")


@dataclass
class _Block:
    """Tokens that attend only among themselves, with their positions, branches and scored tokens.

    `scores` holds (column predicting the token, sequence index) per scored token; the target is
    `tokens[scored_at]` for the matching entry of `scored_at`.
    """

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    scores: list[tuple[int, int]] = field(default_factory=list)  # (predicting column, sequence)
    scored_at: list[int] = field(default_factory=list)  # column of each scored token


def _sequence_block(prompt: Sequence[int], response: Sequence[int], seq: int,
                    mask: Sequence[bool] | None = None) -> _Block:
    n_prompt, n = len(prompt), len(prompt) + len(response)
    block = _Block(list(prompt) + list(response), list(range(n)), [SHARED] * n)
    for col in range(n_prompt, n):
        if mask is not None and not mask[col - n_prompt]:
            continue  # --train-on-turns all: a user turn or template markup inside the response
        # The hidden state at col - 1 predicts the token at col.
        block.scores.append((col - 1, seq))
        block.scored_at.append(col)
    return block


def _pair_block(pair: TokenizedPair, i: int, num_pairs: int) -> _Block:
    """prompt + chosen + rejected; rejected's first token is predicted from the last prompt token."""
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    block = _Block(
        list(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids),
        list(range(p + c)) + list(range(p, p + r)),
        [SHARED] * p + [CHOSEN] * c + [REJECTED] * r,
    )
    for k in range(c):
        if pair.chosen_mask is not None and not pair.chosen_mask[k]:
            continue
        block.scores.append((p - 1 + k, i))
        block.scored_at.append(p + k)
    for k in range(r):
        if pair.rejected_mask is not None and not pair.rejected_mask[k]:
            continue
        block.scores.append((p - 1 if k == 0 else p + c + k - 1, num_pairs + i))
        block.scored_at.append(p + c + k)
    return block


def _blocks(pairs: Sequence[TokenizedPair], layout: str) -> list[_Block]:
    b = len(pairs)
    if layout == "prefix-shared":
        return [_pair_block(p, i, b) for i, p in enumerate(pairs)]
    chosen = [_sequence_block(p.prompt_ids, p.chosen_ids, i, p.chosen_mask) for i, p in enumerate(pairs)]
    rejected = [_sequence_block(p.prompt_ids, p.rejected_ids, b + i, p.rejected_mask) for i, p in enumerate(pairs)]
    return chosen + rejected


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: block indices per row, each row's total length <= max(capacity, longest)."""
    capacity = max(capacity, max(lengths, default=0))
    rows: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, left in enumerate(room):
            if lengths[idx] <= left:
                rows[r].append(idx)
                room[r] -= lengths[idx]
                break
        else:
            rows.append([idx])
            room.append(capacity - lengths[idx])
    return rows


def plan_rows(pairs: Sequence[TokenizedPair], layout: str, pack_length: int = 0) -> list[list[int]]:
    """Lengths of the blocks in each row: what `collate` would build, without building tensors."""
    blocks = _blocks(pairs, layout)
    if layout == "padded":
        return [[len(bl.tokens)] for bl in blocks]
    return [[len(blocks[j].tokens) for j in row] for row in pack_rows([len(bl.tokens) for bl in blocks],
                                                                         pack_length)]


def block_lengths(pair: TokenizedPair, layout: str) -> list[int]:
    """Lengths of the blocks `pair` becomes in `layout`: its two sequences, or one prompt + both responses."""
    if layout == "prefix-shared":
        return [len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)]
    return [len(pair.prompt_ids) + len(pair.chosen_ids), len(pair.prompt_ids) + len(pair.rejected_ids)]


def most_mask_cells(pairs: Sequence[TokenizedPair], batch_pairs: int, layout: str, pack_length: int = 0) -> int:
    """A bound on rows x width^2 (a [T x T] mask per row) of any batch of at most `batch_pairs` of
    `pairs` collated in `layout`, whatever pairs it holds.

    A batch of K blocks (K = 2 x pairs packed, 1 x pairs prefix-shared) has at most K rows, each at
    most C wide, C = max(pack_length, its longest block) <= W, W = max(pack_length, the longest
    block of `pairs`). First fit leaves at most one row filled to C/2 or less (a block that opened
    a later row would have fitted there), so rows < 2S/C + 1 for S tokens, and
    rows x C^2 < 2SC + C^2 <= 2 S_K W + W^2, S_K the sum of the K longest blocks.
    """
    if layout == "padded" or not pairs:
        return 0
    lengths = sorted((n for p in pairs for n in block_lengths(p, layout)), reverse=True)
    per_batch = batch_pairs * (1 if layout == "prefix-shared" else 2)
    widest, most_tokens = max(pack_length, lengths[0]), sum(lengths[:per_batch])
    return min(per_batch * widest**2, 2 * most_tokens * widest + widest**2)


def collate(pairs: Sequence[TokenizedPair], pad_id: int, layout: str = "padded", pack_length: int = 0) -> PairBatch:
    """Build one batch of `pairs` in `layout`; `pack_length` is the packed rows' minimum capacity."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    blocks = _blocks(pairs, layout)
    if layout == "padded":
        rows = [[j] for j in range(len(blocks))]
    else:
        rows = pack_rows([len(bl.tokens) for bl in blocks], pack_length)
    width = max(sum(len(blocks[j].tokens) for j in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    branches = torch.zeros(shape, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.bool)
    score_rows, score_cols, targets, score_seq = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for j in row:
            bl = blocks[j]
            n = len(bl.tokens)
            input_ids[r, offset : offset + n] = torch.tensor(bl.tokens)
            positions[r, offset : offset + n] = torch.tensor(bl.positions)
            branches[r, offset : offset + n] = torch.tensor(bl.branches)
            segments[r, offset : offset + n] = j
            real[r, offset : offset + n] = True
            for (col, seq), at in zip(bl.scores, bl.scored_at, strict=True):
                score_rows.append(r)
                score_cols.append(offset + col)
                targets.append(bl.tokens[at])
                score_seq.append(seq)
            offset += n
        # Padding continues its own position count so it stays a valid (never scored) sequence.
        positions[r, offset:] = torch.arange(width - offset)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    packed = layout != "padded"
    return PairBatch(
        layout=layout,
        input_ids=input_ids,
        attention_mask=None if packed else real.long(),
        position_ids=positions if packed else None,
        segment_ids=segments if packed else None,
        branch_ids=branches if packed else None,
        score_rows=as_long(score_rows),
        score_cols=as_long(score_cols),
        targets=as_long(targets),
        score_seq=as_long(score_seq),
        num_pairs=len(pairs),
        num_tokens=int(real.sum()),
    )


def collate_padded(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Stack chosen rows then rejected rows, each as prompt + response, right-padded."""
    return collate(pairs, pad_id, "padded")

