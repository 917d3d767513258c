"""What a model's attention can take: which batch layouts are exact for it, and their masks.

Packed and prefix-shared rows put several sequences in one row, so the attention pattern of each
sequence has to be rebuilt by hand: causal within a block, rejected never sees chosen, and, for
sliding-window or local layers, keys at most `window - 1` *positions* back. The window is
measured by position within a sequence (not by column), which is exact for prefix-shared rows
too: rejected tokens carry positions len(prompt) + k, as in an unshared forward.

What cannot be made exact from the outside is excluded by reading the model's config
(`layout_blocker`) and by probing what its code does (`capability`): `--layout auto` never picks
such a layout, an explicit `--layout` fails with the reason. Under FlashAttention, packed rows are flattened to one row with explicit varlen
arguments (`cu_seq_lens_q/k`, `max_length_q/k`), so correctness never rests on transformers
guessing sequence starts from the position ids.

Segment attention (`--attention segments`, and `auto` where it is exact and the run's batches are
large; `segment_attention.py`) runs each sequence of a packed row through SDPA's fused causal
kernel instead of a [T x T] mask. Whether it runs is decided once per run (`choose_attention`),
so every batch of the run (training, evaluation, the reference pass) and the first-batch check
(`layout_guard`) take the same kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpokit.data.batching import PairBatch, collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import first_line
from dpokit.model.segment_attention import (  # noqa: F401 - re-exported: callers import them from here
    SEGMENT_RUNS,
    SEGMENTS,
    SegmentRuns,
    SegmentRunsMissing,
    placeholder_mask,
    register_segments,
    segment_attention,
    segment_runs,
)

FULL, SLIDING = "full_attention", "sliding_attention"
PACKED_LAYOUTS = ("packed", "prefix-shared")

_ALIBI_FROM_PADDING = ("ALiBi biases are built from a 2D padding mask, which a packed row cannot express; "
                       "use --layout padded")
_ALIBI_BY_COLUMN = ("ALiBi measures distance by column, so rejected tokens would sit len(chosen) too far from "
                    "the prompt; use --layout padded or packed")
_LOCAL_BY_COLUMN = ("its local attention window is measured by column, so rejected tokens would lose prompt "
                    "tokens they see in an unshared forward; use --layout padded or packed")


def config_of(model):
    """The model's config; a LoRA reference (`models.AdaptersDisabled`) holds it on its peft model."""
    config = getattr(model, "config", None)
    return config if config is not None else getattr(getattr(model, "peft_model", None), "config", None)


def attention_impl(model) -> str:
    return getattr(config_of(model), "_attn_implementation", None) or "eager"


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
    config, impl = config_of(model), attention_impl(model)
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


def attention_inputs(model, batch: PairBatch, windows: dict[str, int | None] | None = None) -> dict:
    """The input_ids / attention_mask / position_ids (and varlen or segment) keyword arguments for `batch`.

    `windows`: the sliding windows the model's own padded forward applies (`capability.applied_windows`);
    None takes the config's word for them (`layer_windows`). Raises ValueError when the layout
    cannot be exact for this model (see `layout_blocker`).
    """
    if batch.layout == "padded":
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    why = layout_blocker(model, batch.layout)
    if why is not None:
        raise ValueError(f"--layout {batch.layout} is not exact for this model: {why}")
    if "flash" in attention_impl(model):
        return varlen_inputs(batch)
    rows, width = batch.input_ids.shape
    if attention_impl(model) == SEGMENTS:
        return {"input_ids": batch.input_ids, "attention_mask": placeholder_mask(rows, width, batch.input_ids.device),
                "position_ids": batch.position_ids, SEGMENT_RUNS: segment_runs(batch.segment_ids, batch.branch_ids)}
    masks = {}
    for key, window in (layer_windows(config_of(model)) if windows is None else windows).items():
        allowed = block_attention_mask(batch.segment_ids, batch.branch_ids, batch.position_ids, window)
        masks[key] = _additive(allowed) if attention_impl(model) == "eager" else allowed
    mask = masks if len(masks) > 1 else masks[FULL]
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}


# ----------------------------------------------------------------------------- choosing segment attention
# `--attention auto` runs segments for a run whose batches' masks could reach this many cells
# (rows x width x width, `batching.most_mask_cells`). The masks are a bool [R, 1, T, T] tensor, and
# SDPA on the CPU turns a bool mask into a float one of the same shape for each layer: 5 bytes a
# cell in fp32, so 2^24 cells are 80 MiB. Measured on this 2-core CPU (benchmarks/RESULTS.md
# section 5): the 4k set's reference pass (8 rows of 4091 tokens, 134M cells) spent 640 MB on
# masks; the demo's short rows (well under 2^24 cells) train 1.56x faster with masks (153.5 vs
# 98.5 pairs/s, batch 32). The choice is made once per run, from a bound on every batch it will
# score, so no batch takes a kernel the first-batch check did not run.
AUTO_SEGMENTS_MIN_MASK_CELLS = 2**24


def _transformers_model(model):
    """The transformers model under a peft wrapper or a LoRA reference (`AdaptersDisabled`)."""
    model = getattr(model, "peft_model", model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def model_device(model) -> torch.device:
    """Where `model`'s weights are (a LoRA reference's: its peft model's)."""
    return next(_transformers_model(model).parameters()).device


def probe_ids(model, count: int) -> tuple[int, ...]:
    """`count` ordinary token ids for a probe forward: 3, 4, ... (wrapping inside the vocabulary)."""
    vocab = getattr(config_of(model), "vocab_size", None) or 8
    return tuple(3 + i % max(1, vocab - 3) for i in range(count))


def segments_blocker(model, windows: dict[str, int | None] | None = None) -> str | None:
    """Why segment attention cannot give this model's exact attention, or None when it can.

    `windows`: the sliding windows the model's padded forward applies (`capability.applied_windows`;
    None: the config's word). Read from the model's class and config; `choose_attention` then runs
    a packed probe batch, which is how a model whose layers drop the runs is found."""
    config, impl = config_of(model), attention_impl(model)
    if impl not in ("sdpa", SEGMENTS):
        return f"attention {impl} (segment attention replaces sdpa only)"
    if not getattr(type(_transformers_model(model)), "_supports_attention_backend", False):
        return f"{getattr(config, 'model_type', 'this model')} does not pass attention arguments through"
    if (layer_windows(config) if windows is None else windows) != {FULL: None}:
        return "sliding-window layers need a windowed mask"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention scores"
    return layout_blocker(model, "prefix-shared")


def _runs_reach_attention(model) -> str | None:
    """Run a packed probe batch (two short sequences in one row) under segment attention: why it
    cannot run, or None. A layer that drops the runs makes `segment_attention` raise."""
    ids = probe_ids(model, 6)
    batch = collate([TokenizedPair(ids[:3], ids[3:5], ids[5:], 0)], 0, "packed", pack_length=16)
    try:
        with torch.no_grad():
            model(**attention_inputs(model, batch.to(model_device(model))), use_cache=False)
    except SegmentRunsMissing:
        return "its layers do not pass the forward's keyword arguments to attention (segment attention got no runs)"
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        return f"a packed forward under segment attention fails ({type(exc).__name__}: {first_line(exc)})"
    return None


def _install_segments(model) -> str | None:
    """Make segment attention `model`'s attention; if the probe batch cannot run, put the previous
    attention back and return why."""
    config = config_of(model)
    previous = "sdpa" if config._attn_implementation == SEGMENTS else config._attn_implementation
    register_segments()
    config._attn_implementation = SEGMENTS
    why = _runs_reach_attention(model)
    if why is not None:
        config._attn_implementation = previous
    return why


def choose_attention(model, choice: str, log: Callable[[str], None] = print, *, mask_cells: int | None = None,
                     windows: dict[str, int | None] | None = None) -> str:
    """Install segment attention on `model` where `choice` and the model allow; returns what runs.

    "segments" on a model that cannot take it is an error with the reason; "auto" falls back to
    the mask path with one log line; "masks" keeps the hand-built [T x T] masks. Under "auto",
    `mask_cells` is the most mask cells any batch of the run can have (`batching.most_mask_cells`):
    a run below AUTO_SEGMENTS_MIN_MASK_CELLS keeps the masks (exact too, and faster on such rows);
    None (not known) takes segments where exact. One choice per run: every batch takes it.
    """
    if choice == "masks" or (choice == "auto" and mask_cells is not None and mask_cells < AUTO_SEGMENTS_MIN_MASK_CELLS):
        if attention_impl(model) == SEGMENTS:  # chosen before (another run of the same model object)
            config_of(model)._attn_implementation = "sdpa"
        return attention_impl(model)
    why = segments_blocker(model, windows) or _install_segments(model)
    if why is not None:
        message = f"--attention segments is not exact for {getattr(config_of(model), 'model_type', 'this model')}: {why}"
        if choice == "segments":
            raise ValueError(message)
        log(f"attention: {message}; using [T x T] masks for packed rows")
        return attention_impl(model)
    return SEGMENTS
