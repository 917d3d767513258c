"""What a model's attention can take: which batch layouts are exact for it, and their masks.

Packed and prefix-shared rows put several sequences in one row, so the attention pattern of each
sequence has to be rebuilt by hand: causal within a block, rejected never sees chosen, and, for
sliding-window or local layers, keys at most `window - 1` *positions* back. The window is
measured by position within a sequence (not by column), which is exact for prefix-shared rows
too: rejected tokens carry positions len(prompt) + k, as in an unshared forward.

What cannot be made exact from the outside is excluded by reading the model's config
(`layout_blocker`): `--layout auto` never picks such a layout, an explicit `--layout` fails with
the reason. Under FlashAttention, packed rows are flattened to one row with explicit varlen
arguments (`cu_seq_lens_q/k`, `max_length_q/k`), so correctness never rests on transformers
guessing sequence starts from the position ids.

Segment attention (`--attention segments`, and `auto` where it is exact): packed and
prefix-shared rows reduce to plain causal attention over runs of columns (a packed sequence; a
prompt + chosen; a prompt + rejected), so each run goes through SDPA's fused causal kernel (flash
on CPU and CUDA) and no [T x T] mask or score matrix is ever built: attention memory is linear in
the sequence length. FlexAttention would express the same masks as block masks, but in torch 2.13
it has no backward on CPU ("FlexAttention does not support backward on CPU"), so it cannot train
here; the runs below are the same description the block masks would be built from.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.data.batching import SHARED, PairBatch

FULL, SLIDING = "full_attention", "sliding_attention"
PACKED_LAYOUTS = ("packed", "prefix-shared")

_ALIBI_FROM_PADDING = ("ALiBi biases are built from a 2D padding mask, which a packed row cannot express; "
                       "use --layout padded")
_ALIBI_BY_COLUMN = ("ALiBi measures distance by column, so rejected tokens would sit len(chosen) too far from "
                    "the prompt; use --layout padded or packed")
_LOCAL_BY_COLUMN = ("its local attention window is measured by column, so rejected tokens would lose prompt "
                    "tokens they see in an unshared forward; use --layout padded or packed")


def _config(model):
    """The model's config; a LoRA reference (`models.AdaptersDisabled`) holds it on its peft model."""
    config = getattr(model, "config", None)
    return config if config is not None else getattr(getattr(model, "peft_model", None), "config", None)


def attention_impl(model) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


def _uses_alibi(config) -> bool:
    attn_config = getattr(config, "attn_config", None)  # MPT keeps it in a sub-config
    return bool(getattr(config, "alibi", False) or getattr(attn_config, "alibi", False)
                or getattr(config, "position_embedding_type", None) == "alibi"
                or getattr(config, "model_type", None) == "bloom")


def layer_windows(config) -> dict[str, int | None]:
    """Mask key -> sliding window (None = full causal) of the layers that read that mask.

    Models with per-layer types (Gemma 2/3, Qwen2/3 with max_window_layers, ...) take a dict of
    masks keyed by layer type; models with one `sliding_window` and no layer types (Mistral,
    Mixtral, Phi-3, Starcoder2) window every layer; the rest attend fully.
    """
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    types = set(getattr(config, "layer_types", None) or ())
    if types and window is not None and SLIDING in types:
        return {FULL: None, SLIDING: window}
    if not types and window is not None:
        return {FULL: window}
    return {FULL: None}


def layout_blocker(model, layout: str) -> str | None:
    """Why `layout` cannot give this model's exact log-probs, or None when it can."""
    if layout not in PACKED_LAYOUTS:
        return None
    config, impl = _config(model), attention_impl(model)
    if impl not in ("sdpa", "eager", SEGMENTS) and not ("flash" in impl and layout == "packed"):
        return f"attention {impl} supports only --layout padded" + (" or packed" if "flash" in impl else "")
    model_type = getattr(config, "model_type", None)
    unknown = set(getattr(config, "layer_types", None) or ()) - {FULL, SLIDING}
    if unknown:
        return f"layer type {sorted(unknown)[0]} has no exact {layout} mask; use --layout padded"
    if _uses_alibi(config):
        if model_type == "mpt":
            return _ALIBI_BY_COLUMN if layout == "prefix-shared" else None
        return _ALIBI_FROM_PADDING
    if model_type == "gpt_neo" and "local" in (getattr(config, "attention_layers", None) or ()):
        return _LOCAL_BY_COLUMN if layout == "prefix-shared" else None
    return None


def block_attention_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor,
                         window: int | None = None) -> torch.Tensor:
    """(R, T) segments, branches, positions -> (R, 1, T, T) bool, True where query t may attend key s.

    t attends s when both are in the same block, s <= t, s is shared (prompt) or on t's own
    branch (rejected never sees chosen), and, with a window, position(t) - position(s) < window.
    """
    width = segment_ids.shape[1]
    idx = torch.arange(width, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_block = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_branch = branch_ids[:, None, :]
    visible = (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    allowed = same_block & visible & causal
    if window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    return allowed[:, None]


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """Eager attention adds the mask to the scores: 0 where allowed, the float minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min)


def varlen_inputs(batch: PairBatch) -> dict:
    """Packed rows as one flattened row with explicit FlashAttention varlen arguments.

    Every block (and each row's trailing padding) is one sequence; `cu_seq_lens` are their start
    offsets in the flattened row. Outputs come back as (1, R*T, ...) and are viewed as (R, T, ...).
    """
    rows, width = batch.input_ids.shape
    flat = batch.segment_ids.reshape(-1)  # block ids are unique across rows; padding is -1
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts.view(rows, width)[:, 0] = True  # a new row always starts a new sequence (its padding ends one)
    offsets = torch.nonzero(starts).flatten()
    cu = torch.cat([offsets, offsets.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"input_ids": batch.input_ids.reshape(1, -1), "attention_mask": None,
            "position_ids": batch.position_ids.reshape(1, -1), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def attention_inputs(model, batch: PairBatch) -> dict:
    """The input_ids / attention_mask / position_ids (and varlen) keyword arguments for `batch`.

    Raises ValueError when the layout cannot be exact for this model (see `layout_blocker`).
    """
    if batch.layout == "padded":
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    why = layout_blocker(model, batch.layout)
    if why is not None:
        raise ValueError(f"--layout {batch.layout} is not exact for this model: {why}")
    if "flash" in attention_impl(model):
        return varlen_inputs(batch)
    rows, width = batch.input_ids.shape
    if attention_impl(model) == SEGMENTS and rows * width * width >= getattr(
            _config(model), "dpokit_segments_min_mask_cells", 0):
        # A 4D mask reaches the attention function as is; this one is a stride-0 view of one
        # element, so transformers neither builds a [T x T] mask nor looks for packing itself.
        unused = torch.ones((), dtype=torch.bool, device=batch.input_ids.device).expand(rows, 1, width, width)
        return {"input_ids": batch.input_ids, "attention_mask": unused, "position_ids": batch.position_ids,
                SEGMENT_RUNS: segment_runs(batch.segment_ids, batch.branch_ids)}
    masks = {}
    for key, window in layer_windows(_config(model)).items():
        allowed = block_attention_mask(batch.segment_ids, batch.branch_ids, batch.position_ids, window)
        masks[key] = _additive(allowed) if attention_impl(model) == "eager" else allowed
    mask = masks if len(masks) > 1 else masks[FULL]
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}


# ----------------------------------------------------------------------------- segment attention
SEGMENTS = "dpokit_segments"  # the attention implementation registered with transformers
SEGMENT_RUNS = "dpokit_segment_runs"  # the forward keyword argument that carries a batch's runs to it
# `--attention auto` runs segments on a batch whose masks would have at least this many cells
# (rows x width x width). The masks are a bool [R, 1, T, T] tensor, and SDPA on the CPU turns a
# bool mask into a float one of the same shape for each layer: 5 bytes a cell in fp32, so 2^24
# cells are 80 MiB. Measured on this 2-core CPU (benchmarks/RESULTS.md section 5): the 4k set's
# reference pass (8 rows of 4091 tokens, 134M cells) spent 640 MB on masks; the demo's short rows
# (well under 2^24 cells) train 1.56x faster with masks (153.5 vs 98.5 pairs/s, batch 32).
AUTO_SEGMENTS_MIN_MASK_CELLS = 2**24
Span = tuple[int, int]


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
    same pattern `block_attention_mask` builds as a matrix (without a window).
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


def _columns(t: torch.Tensor, row: int, spans: tuple[Span, ...]) -> torch.Tensor:
    """(R, H, T, D) -> (1, H, n, D): row `row`, the columns of `spans` in order (a view for one span)."""
    pieces = [t[row : row + 1, :, a:b] for a, b in spans]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """transformers attention function: causal SDPA per run when the forward carries SEGMENT_RUNS.

    query (R, H, T, D), key/value (R, H_kv, T, D) -> ((R, T, H, D), None). Without runs (a padded
    batch, generation) it is transformers' own SDPA attention, unchanged.
    """
    runs = kwargs.pop(SEGMENT_RUNS, None)
    if runs is None:
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


def _transformers_model(model):
    """The transformers model under a peft wrapper or a LoRA reference (`AdaptersDisabled`)."""
    model = getattr(model, "peft_model", model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def segments_blocker(model) -> str | None:
    """Why segment attention cannot give this model's exact attention, or None when it can."""
    config, impl = _config(model), attention_impl(model)
    if impl not in ("sdpa", SEGMENTS):
        return f"attention {impl} (segment attention replaces sdpa only)"
    if not getattr(type(_transformers_model(model)), "_supports_attention_backend", False):
        return f"{getattr(config, 'model_type', 'this model')} does not pass attention arguments through"
    if layer_windows(config) != {FULL: None}:
        return "sliding-window layers need a windowed mask"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention scores"
    return layout_blocker(model, "prefix-shared")


def choose_attention(model, choice: str, log: Callable[[str], None] = print,
                     min_mask_cells: int | None = None) -> str:
    """Install segment attention on `model` where `choice` and the model allow; returns what runs.

    "segments" on a model that cannot take it is an error with the reason; "auto" falls back to
    the mask path with one log line; "masks" keeps the hand-built [T x T] masks. Under "auto", a
    batch whose masks would have fewer than `min_mask_cells` cells (rows x width^2, default
    AUTO_SEGMENTS_MIN_MASK_CELLS) keeps them: both are exact, and such masks are small and faster.
    """
    if choice == "masks":
        return attention_impl(model)
    why = segments_blocker(model)
    if why is not None:
        message = f"--attention segments is not exact for {getattr(_config(model), 'model_type', 'this model')}: {why}"
        if choice == "segments":
            raise ValueError(message)
        log(f"attention: {message}; using [T x T] masks for packed rows")
        return attention_impl(model)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _config(model)._attn_implementation = SEGMENTS
    _config(model).dpokit_segments_min_mask_cells = (
        0 if choice == "segments" else AUTO_SEGMENTS_MIN_MASK_CELLS if min_mask_cells is None else min_mask_cells)
    return SEGMENTS
