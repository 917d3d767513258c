"""The run-time guard for what the conformance matrix and the capability probes do not know.

Before the first step (and before reference log-probs are precomputed in the same layouts), the
first batch, every pair of it as training collates it, is scored twice with gradients off:
padded with the model's own LM head (the plain forward every layout must equal), and in each
layout the scorer may pick, with the LM head and the attention kernel its batches use (the
attention is one choice per run, `attention.choose_attention`, so no later batch takes another
kernel; the precomputed reference is scored in batches of the same size, layouts and kernel).
The policy is checked, and a live reference that is another model (`--reference-model`,
`dpokit evaluate`'s reference) too. A gap beyond float tolerance means the model does
something the layouts do not reproduce: under `auto` the run falls back to padded + plain with
one log line; a layout or head the user asked for explicitly stops the run with the gap. The
outcome is written to `layout_check.json` in the run folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dpokit.data import TokenizedPair
from dpokit.data.batching import collate
from dpokit.errors import DpokitError, first_line
from dpokit.io import Log, atomic_write_text
from dpokit.model.attention import attention_impl
from dpokit.model.capability import ModelForward
from dpokit.model.logprobs import PairLogps, sequence_logps
from dpokit.model.router_loss import check_router_gap

# fp32: summed log-probs of a few hundred tokens agree across layouts to ~1e-5 (the conformance
# matrix); wrong attention shows up as 1e-2 and more. The relative term covers long sequences:
# fp32 sums of n log-probs carry about |sum| x 1e-7 to 1e-6 of rounding, ten times less.
ABSOLUTE_TOLERANCE = 1e-3
RELATIVE_TOLERANCE = 1e-5


def _fp32_logps(model, forward: ModelForward, pairs, scorer, layout: str, chunked_head, chunk,
                router=None) -> PairLogps:
    # Always fp32: the guard asks whether a layout is exact, not how bf16 rounds in it.
    # `router`: the MoE load-balancing term, on the policy only (the reference never computes it).
    batch = collate(pairs, scorer.pad_id, layout, scorer.speed.pack_length).to(scorer.device)
    with torch.no_grad(), torch.autocast(device_type=scorer.device.type, enabled=False):
        return sequence_logps(model, batch, chunked_head, chunk, forward=forward, router=router)


def _gap(a: PairLogps, b: PairLogps) -> tuple[float, float]:
    """Largest |a - b| over every sequence, and the tolerance for it."""
    ref = torch.cat([a.chosen_logps, a.rejected_logps])
    other = torch.cat([b.chosen_logps, b.rejected_logps])
    return (ref - other).abs().max().item(), ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * ref.abs().max().item()


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def check_first_batch(scorer, pairs: Sequence[TokenizedPair], output: Path | None, log: Log = print, *,
                      check_reference: bool = False) -> dict:
    """Compare the scorer's layouts, head and attention with padded + plain on `pairs` (the whole
    first batch), for the policy and, with `check_reference`, the live reference; fall back if
    they differ. Returns the record, written to `output / layout_check.json` (when `output` is given).
    """
    policy = scorer.policy
    roles = [role for role in scorer.models() if role == "policy" or check_reference]
    heads = {role: _head(scorer, role) for role in roles}
    record = {"model_type": _model_type(policy), "layouts": list(scorer.layouts), "lm_head": heads["policy"],
              "attention": attention_impl(policy), "pairs": len(pairs), "checked": [], "fallback": False}
    candidates = [lay for lay in scorer.layouts if lay != "padded"] or ["padded"]
    if candidates == ["padded"] and set(heads.values()) == {"plain"} or not pairs:
        return _write(record, output)
    started, started_cpu = time.perf_counter(), time.process_time()
    for role in roles:
        if candidates != ["padded"] or heads[role] != "plain":
            record["checked"] += _check_model(scorer, role, pairs, candidates, heads[role] == "chunked")
    # Its cost, for the benchmark (CPU seconds move less than wall time on a shared machine).
    record["seconds"] = round(time.perf_counter() - started, 4)
    record["cpu_seconds"] = round(time.process_time() - started_cpu, 4)
    failed = [c for c in record["checked"] if not c["exact"]]
    if failed:
        _fall_back(scorer, record, failed[0], log)
    return _write(record, output)


def _head(scorer, role: str) -> str:
    chunked = scorer.forwards[role].plain_head if scorer.chunked_head is None else scorer.chunked_head
    return "chunked" if chunked else "plain"


def _check_model(scorer, role: str, pairs, layouts: Sequence[str], chunked: bool) -> list[dict]:
    """One model's entries: each layout's largest gap to padded + plain, the tolerance, and whether it is within."""
    model, forward = scorer.models()[role], scorer.forwards[role]
    module = getattr(model, "peft_model", model)  # a LoRA reference switches its peft model
    was_training = getattr(module, "training", False)
    if was_training:
        module.eval()
    try:
        router = getattr(scorer, "router", None) if role == "policy" else None
        plain = _fp32_logps(model, forward, pairs, scorer, "padded", False, None, router)
        return [_check(model, forward, role, pairs, scorer, layout, chunked, plain, router) for layout in layouts]
    finally:
        if was_training:
            module.train()


def _check(model, forward: ModelForward, role: str, pairs, scorer, layout: str, chunked: bool,
           plain: PairLogps, router=None) -> dict:
    entry = {"model": role, "layout": layout, "lm_head": "chunked" if chunked else "plain"}
    try:
        got = _fp32_logps(model, forward, pairs, scorer, layout, chunked, scorer.speed.lm_head_chunk or None, router)
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:  # a layout the model cannot run
        return {**entry, "gap": None, "error": f"{type(exc).__name__}: {first_line(exc)}", "exact": False}
    gap, tolerance = _gap(plain, got)
    return check_router_gap({**entry, "gap": gap, "tolerance": tolerance, "exact": gap <= tolerance},
                            plain.router, got.router)


def _fall_back(scorer, record: dict, failed: dict, log) -> None:
    """Padded + plain under auto (one log line); a stop with the gap for an explicit choice."""
    speed = scorer.speed
    model = scorer.models()[failed["model"]]
    who = _model_type(model) if failed["model"] == "policy" else f"the reference ({_model_type(model)})"
    gap = f"{failed['gap']:.3g}" if failed["gap"] is not None else f"an error ({failed['error']})"
    where = (f"the {failed['layout']} layout with the {failed['lm_head']} LM head and {attention_impl(model)} "
             "attention")
    if speed.layout not in ("auto", "padded") or speed.lm_head == "chunked":
        raise DpokitError(f"--layout {speed.layout} --lm-head {speed.lm_head} is not exact for {who}: "
                          f"on the first batch {where} differs from the padded forward by {gap}; "
                          "use --layout padded --lm-head plain")
    scorer.layouts, scorer.chunked_head = ["padded"], False
    record.update(fallback=True, layouts=["padded"], lm_head="plain")
    log(f"layout check: {who}: {where} differs from the padded forward by {gap} on the first batch; "
        "using --layout padded --lm-head plain")


def _write(record: dict, output: Path | None) -> dict:
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "layout_check.json", json.dumps(record, indent=1) + "\n")
    return record
