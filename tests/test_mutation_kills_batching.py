"""Tests written to kill mutants of data/batching.py that the suite let survive (benchmarks/mutation.py):
per-token masks in every layout, the padding conventions, and the row plan `collate` follows."""

from __future__ import annotations

import pytest
import torch

from dpokit.data.batching import LAYOUTS, block_lengths, collate, most_mask_cells, plan_rows
from dpokit.data.tokenize import TokenizedPair

BOS, EOS, PAD = 1, 2, 0


def _pairs():
    # Pair 0 masks tokens out of both responses (--train-on-turns all: a user turn inside the reply).
    return [
        TokenizedPair((BOS, 10, 11), (20, 21, 22, EOS), (30, 31, EOS), 0,
                      chosen_mask=(True, False, True, True), rejected_mask=(False, True, True)),
        TokenizedPair((BOS, 12), (23, EOS), (32, 33, 34, 35, EOS), 1),
    ]


def _scored(batch, seq):
    """The scored tokens of sequence `seq`, in order, and the tokens at the predicting positions' next column."""
    picked = batch.score_seq == seq
    return batch.targets[picked].tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_tokens_are_never_scored_in_any_layout(layout):
    pairs = _pairs()
    batch = collate(pairs, PAD, layout, pack_length=8)
    assert _scored(batch, 0) == [20, 22, EOS]  # chosen of pair 0, its masked 21 left out
    assert _scored(batch, 2) == [31, EOS]  # rejected of pair 0, its masked 30 left out
    assert _scored(batch, 1) == [23, EOS]
    assert _scored(batch, 3) == [32, 33, 34, 35, EOS]


@pytest.mark.parametrize("layout", ["packed", "prefix-shared"])
def test_padding_is_in_no_segment_and_continues_its_own_positions(layout):
    batch = collate(_pairs(), PAD, layout, pack_length=0)
    real = batch.segment_ids >= 0
    assert int(real.sum()) == batch.num_tokens
    assert (batch.input_ids[~real] == PAD).all()
    for r in range(batch.input_ids.shape[0]):
        pad_cols = (~real[r]).nonzero().flatten()
        if len(pad_cols):
            assert batch.segment_ids[r, pad_cols].tolist() == [-1] * len(pad_cols)
            assert batch.position_ids[r, pad_cols].tolist() == list(range(len(pad_cols)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pack_length", [0, 9, 40])
def test_plan_rows_is_the_row_plan_collate_builds(layout, pack_length):
    pairs = _pairs()
    plan = plan_rows(pairs, layout, pack_length)
    batch = collate(pairs, PAD, layout, pack_length)
    assert len(plan) == batch.input_ids.shape[0]
    assert max(sum(row) for row in plan) == batch.input_ids.shape[1]
    assert sum(map(sum, plan)) == batch.num_tokens
    assert sorted(n for row in plan for n in row) == sorted(n for p in pairs for n in block_lengths(p, layout))


def test_block_lengths_per_layout():
    pair = _pairs()[0]
    assert block_lengths(pair, "padded") == [3 + 4, 3 + 3]
    assert block_lengths(pair, "packed") == [3 + 4, 3 + 3]
    assert block_lengths(pair, "prefix-shared") == [3 + 4 + 3]


def test_moving_a_batch_keeps_every_field():
    batch = collate(_pairs(), PAD, "prefix-shared")
    moved = batch.to("cpu")
    for name, value in vars(batch).items():
        other = getattr(moved, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def test_most_mask_cells_by_hand():
    # Blocks: packed 7, 6 (pair 0) and 4, 7 (pair 1); prefix-shared 10 and 9. The bound is
    # min(K·W², 2·S_K·W + W²): K blocks per batch, W = max(pack_length, longest), S_K the K longest.
    pairs = _pairs()
    assert most_mask_cells(pairs, 1, "packed") == min(2 * 7**2, 2 * 14 * 7 + 7**2) == 98
    assert most_mask_cells(pairs, 2, "packed", 20) == min(4 * 20**2, 2 * 24 * 20 + 20**2) == 1360
    assert most_mask_cells(pairs, 2, "prefix-shared") == min(2 * 10**2, 2 * 19 * 10 + 10**2) == 200
    assert most_mask_cells(pairs, 1, "prefix-shared", 12) == min(12**2, 2 * 10 * 12 + 12**2) == 144
    assert most_mask_cells(pairs, 2, "padded") == 0
    assert most_mask_cells([], 2, "packed") == 0
