"""Segment attention: packed and prefix-shared rows as plain causal runs through SDPA's fused kernel.

Packed and prefix-shared rows reduce to plain causal attention over runs of columns (a packed
sequence; a prompt + chosen; a prompt + rejected), so each run goes through SDPA's fused causal
kernel (flash on CPU and CUDA) and no [T x T] mask or score matrix is ever built: attention
memory is linear in the sequence length. FlexAttention would express the same masks as block
masks, but in torch 2.13 it has no backward on CPU ("FlexAttention does not support backward on
CPU"), so it cannot train here; the runs below are the same description the block masks would
be built from.

A segment batch reaches the model with a stand-in mask (`placeholder_mask`: a stride-0 view of one
True, so transformers builds no [T x T] mask) and its runs as the forward keyword argument
SEGMENT_RUNS. A decoder layer that drops the keyword arguments on the way to attention
(Nemotron's in transformers 5.24) would hand attention the stand-in alone, which means "every
token sees its whole row": `segment_attention` recognises it and raises `SegmentRunsMissing`
instead of attending with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.data.batching import SHARED

SEGMENTS = "dpokit_segments"  # the attention implementation registered with transformers
SEGMENT_RUNS = "dpokit_segment_runs"  # the forward keyword argument that carries a batch's runs to it
Span = tuple[int, int]


class SegmentRunsMissing(ValueError):
    """Segment attention got a segment batch's stand-in mask without the batch's runs."""


@dataclass(frozen=True)
class SegmentRuns:
    """Each row's attention as plain causal runs, in column order.

    A run is (spans, keep): the columns of `spans` (one [start, end) span, or a shared prompt's
    span and a branch's span) are attended as one causal sequence, and its outputs from index
    `keep` on are the row's outputs at those columns (the first `keep` columns, a shared prompt,
    were computed by the run before). Columns after a row's last run are padding: zeros.
    """

    rows: tuple[tuple[tuple[tuple[Span, ...], int], ...], ...]


def segment_runs(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> SegmentRuns:
    """(R, T) block and branch ids (`data.batching`) -> the causal runs of each row.

    A block is its shared prompt (branch SHARED) followed by branches: the first branch is one
    run with the prompt; every later branch (rejected) is a run over prompt + branch, keeping the
    branch's outputs, so it sees the prompt and itself but never an earlier branch. This is the
    same pattern `attention.block_attention_mask` builds as a matrix (without a window).
    """
    rows = []
    for seg_row, branch_row in zip(segment_ids.tolist(), branch_ids.tolist(), strict=True):
        runs: list[tuple[tuple[Span, ...], int]] = []
        col, block, shared = 0, None, None
        for (seg, branch), group in itertools.groupby(zip(seg_row, branch_row, strict=True)):
            span = (col, col + sum(1 for _ in group))
            col = span[1]
            if seg < 0:  # padding ends the row
                if col != len(seg_row):
                    raise ValueError("segment attention: padding in the middle of a row")
                break
            if seg != block:  # a new block: its first run, shared or not
                block, shared = seg, span if branch == SHARED else None
                runs.append(((span,), 0))
            elif branch == SHARED:
                raise ValueError("segment attention: a shared run after a branch in one block")
            elif shared is not None and runs[-1] == ((shared,), 0):  # the first branch extends the prompt
                runs[-1] = (((shared[0], span[1]),), 0)
            elif shared is not None:  # a later branch: prompt + branch, its own outputs only
                runs.append(((shared, span), shared[1] - shared[0]))
            else:
                runs.append(((span,), 0))
        rows.append(tuple(runs))
    return SegmentRuns(tuple(rows))


def placeholder_mask(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """The (R, 1, T, T) mask a segment batch is given: a 4D mask reaches the attention function as
    is, and this one is a stride-0 view of one element, so transformers neither builds a [T x T]
    mask nor looks for packing itself. No real mask is stored this way."""
    return torch.ones((), dtype=torch.bool, device=device).expand(rows, 1, width, width)


def is_placeholder(mask) -> bool:
    """Whether `mask` is (a slice of) `placeholder_mask`: more than one cell, every stride 0."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and mask.numel() > 1 and not any(mask.stride()))


def _columns(t: torch.Tensor, row: int, spans: tuple[Span, ...]) -> torch.Tensor:
    """(R, H, T, D) -> (1, H, n, D): row `row`, the columns of `spans` in order (a view for one span)."""
    pieces = [t[row : row + 1, :, a:b] for a, b in spans]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """transformers attention function: causal SDPA per run when the forward carries SEGMENT_RUNS.

    query (R, H, T, D), key/value (R, H_kv, T, D) -> ((R, T, H, D), None). Without runs (a padded
    batch, generation) it is transformers' own SDPA attention, unchanged; with the segment
    batch's stand-in mask but no runs it raises `SegmentRunsMissing`.
    """
    runs = kwargs.pop(SEGMENT_RUNS, None)
    if runs is None:
        if is_placeholder(attention_mask):
            raise SegmentRunsMissing("segment attention was called on a packed batch without its runs: the "
                                     "model's layers do not pass the forward's keyword arguments to attention")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # heavy: lazy

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for unsupported in ("softcap", "sliding_window", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"segment attention cannot apply {unsupported}")
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for row, row_runs in enumerate(runs.rows):
        outputs, end = [], 0
        for spans, keep in row_runs:
            q, k, v = (_columns(t, row, spans) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)
            outputs.append(out[:, :, keep:])
            end = spans[-1][1]
        if end < query.shape[2]:
            outputs.append(query.new_zeros(1, query.shape[1], query.shape[2] - end, value.shape[-1]))
        rows.append(torch.cat(outputs, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_segments() -> None:
    """Make SEGMENTS a transformers attention implementation (its masks built as sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
