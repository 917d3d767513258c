"""What one model's forward can take, found once per run by probing the model itself.

The config says what a model should do; a few short probe forwards (a dozen tokens, no
gradient) say what its code does, so a model is excluded by construction, not by a list of
names:

- `applied_windows`: a `sliding_window` on a config without layer types is applied by some
  models (Mistral, Phi-3, Starcoder2) and ignored by others (a stale field, Moshi's default
  3000): the padded forward is run with the window shrunk, and the masks follow what it does.
- `copies_disagree`: two copies of one sequence side by side in a packed row (and one pair
  with chosen == rejected in a prefix-shared row) must score alike. They do not where positions
  are counted by column whatever `position_ids` says (BART-family decoders' learned positions).
- `head_is_plain`: whether `lm_head(body(x))` is the model's own logits (the chunked LM head).

`ModelForward` holds the answers; the scorer keeps one per model and every batch of the run
uses it. The first-batch check (`layout_guard`) then runs the exact batch, so whatever the
probes miss is caught there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dpokit.data.batching import collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import first_line
from dpokit.model.attention import (
    FULL,
    PACKED_LAYOUTS,
    attention_inputs,
    choose_attention,
    config_of,
    layer_windows,
    layout_blocker,
    model_device,
    probe_ids,
)

# Probe forwards run in fp32: identical computations agree to ~1e-6 there, a position or
# window error moves a log-prob by 1e-2 and more.
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ModelForward:
    """What every batch of a run needs to know about one model (`describe_forward`).

    windows:    mask key -> sliding window (None: full causal), as the model's padded forward applies them
    refusals:   layout -> why it cannot be exact for this model (a layout not listed is exact)
    plain_head: whether lm_head(body(x)) == model(x).logits, so `--lm-head auto` takes the chunked head
    offload:    activations saved for backward go to pinned CPU memory (--activation-offload)
    """

    windows: dict[str, int | None] = field(default_factory=lambda: {FULL: None})
    refusals: dict[str, str] = field(default_factory=dict)
    plain_head: bool = False
    offload: bool = False


def describe_forward(model, layouts: Sequence[str] = PACKED_LAYOUTS, *, offload: bool = False,
                     head: bool = True) -> ModelForward:
    """Probe `model` (under the attention it has now) for the packed `layouts` and (`head`) its LM head."""
    windows = applied_windows(model)
    refusals = {}
    for layout in layouts:
        why = layout_blocker(model, layout) or copies_disagree(model, layout, windows)
        if why is not None:
            refusals[layout] = why
    return ModelForward(windows, refusals, head and head_is_plain(model), offload)


def configure_forward(model, *, choice: str, layouts: Sequence[str], mask_cells: int | None,
                      offload: bool = False, log: Callable[[str], None] = print) -> ModelForward:
    """Once per run and model, before anything is scored: probe it, then install the attention its
    packed rows use (`attention.choose_attention`, only where a packed layout is exact for it)."""
    forward = describe_forward(model, layouts, offload=offload)
    if any(layout not in forward.refusals for layout in layouts):
        choose_attention(model, choice, log, mask_cells=mask_cells, windows=forward.windows)
    elif layouts and choice == "segments":  # asked for, and no packed row will run: say so
        model_type = getattr(config_of(model), "model_type", "this model")
        raise ValueError(f"--attention segments is not exact for {model_type}: {forward.refusals[layouts[0]]}")
    return forward


@contextlib.contextmanager
def _probing(model) -> Iterator[None]:
    """No gradient, fp32, eval mode (no dropout) for the probe forwards; the mode is restored."""
    module = getattr(model, "peft_model", model)
    was_training = getattr(module, "training", False)
    if was_training:
        module.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=model_device(model).type, enabled=False):
            yield
    finally:
        if was_training:
            module.train()


def applied_windows(model) -> dict[str, int | None]:
    """Mask key -> window, as the model's own padded forward applies them.

    Layer types (Gemma 2/3, Qwen2) name each layer's mask, so the config's word stands. One
    `sliding_window` and no layer types is a window every layer takes in Mistral, Phi-3 or
    Starcoder2, and a stale field in others: the forward is run with the window at 2 and at the
    probe's length (where it changes nothing); if both agree, the model ignores the field.
    """
    config = config_of(model)
    windows = layer_windows(config)
    if getattr(config, "layer_types", None) or windows == {FULL: None}:
        return windows
    return windows if _forward_reads_window(model) else {FULL: None}


def _forward_reads_window(model) -> bool:
    config = config_of(model)
    saved = config.sliding_window
    ids = torch.tensor([probe_ids(model, 6)], device=model_device(model))
    logits = []
    try:
        with _probing(model):
            for window in (2, ids.shape[1]):
                config.sliding_window = window
                logits.append(model(input_ids=ids, use_cache=False).logits.float())
    finally:
        config.sliding_window = saved
    return not torch.allclose(logits[0], logits[1], rtol=0, atol=PROBE_TOLERANCE)


def copies_disagree(model, layout: str, windows: dict[str, int | None] | None = None) -> str | None:
    """Why one pair with chosen == rejected (two copies of one sequence in one row) scores unlike
    itself in `layout`, or None when both copies score alike, as an exact layout must."""
    ids = probe_ids(model, 7)
    pair = TokenizedPair(ids[:3], ids[3:], ids[3:], 0)
    batch = collate([pair], 0, layout, pack_length=16).to(model_device(model))
    try:
        with _probing(model):
            logits = model(**attention_inputs(model, batch, windows), use_cache=False).logits
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        return f"a {layout} row fails in its forward ({type(exc).__name__}: {first_line(exc)})"
    scored = logits.view(*batch.input_ids.shape, -1)[batch.score_rows, batch.score_cols].float()
    token_logps = torch.log_softmax(scored, -1).gather(-1, batch.targets[:, None])[:, 0]
    chosen, rejected = token_logps[batch.score_seq == 0], token_logps[batch.score_seq == 1]
    gap = (chosen - rejected).abs().max().item()
    if gap <= PROBE_TOLERANCE:
        return None
    return (f"two copies of one sequence in a {layout} row score {gap:.3g} nats apart: its forward does not take "
            "each sequence's positions from position_ids (learned positions counted by column, as in BART-family "
            "decoders)")


def model_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer body that returns final (normed) hidden states, or None if there is none.

    Through a peft wrapper it is the wrapped transformers model's body, whose layers carry the
    adapters (peft's own `base_model` is its tuner, which returns logits)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else model
    body = getattr(inner, "base_model", None)
    return body if isinstance(body, torch.nn.Module) and body is not inner else None


def head_is_plain(model: torch.nn.Module) -> bool:
    """Whether model(x).logits == get_output_embeddings()(body(x)) exactly: a probe forward.

    False for heads that are not a Linear and for models that rescale or soft-cap logits after
    the head; those use the plain path. Call it once per model (`describe_forward` does).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model_body(model)
    if not isinstance(head, torch.nn.Linear) or body is None:
        return False
    device = head.weight.device
    ids = torch.arange(2, 2 + min(8, head.out_features - 2), device=device)[None] % head.out_features
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        try:
            logits = model(input_ids=ids, use_cache=False).logits
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        except (TypeError, AttributeError, RuntimeError, ValueError):
            return False
    return logits.shape == (1, ids.shape[1], head.out_features) and torch.allclose(
        head(hidden), logits, rtol=1e-4, atol=1e-5)
