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
"""

from __future__ import annotations

import torch

from dpokit.data.batching import PairBatch

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
    if impl not in ("sdpa", "eager") and not ("flash" in impl and layout == "packed"):
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
    masks = {}
    for key, window in layer_windows(_config(model)).items():
        allowed = block_attention_mask(batch.segment_ids, batch.branch_ids, batch.position_ids, window)
        masks[key] = _additive(allowed) if attention_impl(model) == "eager" else allowed
    mask = masks if len(masks) > 1 else masks[FULL]
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}
