"""The run-time guard for what the conformance matrix does not know.

Before the first step (and before reference log-probs are precomputed with the same layout),
the first training batch is scored twice with gradients off: padded with the model's own LM
head (the plain forward every layout must equal), and in each layout and with the head the
scorer would use. A gap beyond float tolerance means the model's attention or head does
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
from dpokit.model.logprobs import PairLogps, head_is_plain, sequence_logps
from dpokit.model.router_loss import check_router_gap

# fp32: summed log-probs of a few hundred tokens agree across layouts to ~1e-5 (the conformance
# matrix); wrong attention shows up as 1e-2 and more. The relative term covers long sequences:
# fp32 sums of n log-probs carry about |sum| x 1e-7 to 1e-6 of rounding, ten times less.
ABSOLUTE_TOLERANCE = 1e-3
RELATIVE_TOLERANCE = 1e-5
# Pairs of the first batch that are checked, longest first: a wrong window, position or bias
# shows in any sequence longer than it, and one pair keeps the check a fraction of one step.
CHECKED_PAIRS = 1


def _fp32_logps(model, pairs, scorer, layout: str, chunked_head, chunk) -> PairLogps:
    # Always fp32: the guard asks whether a layout is exact, not how bf16 rounds in it.
    batch = collate(pairs, scorer.pad_id, layout, scorer.speed.pack_length).to(scorer.device)
    with torch.no_grad(), torch.autocast(device_type=scorer.device.type, enabled=False):
        return sequence_logps(model, batch, chunked_head, chunk, router=getattr(scorer, "router", None))


def _gap(a: PairLogps, b: PairLogps) -> tuple[float, float]:
    """Largest |a - b| over every sequence, and the tolerance for it."""
    ref = torch.cat([a.chosen_logps, a.rejected_logps])
    other = torch.cat([b.chosen_logps, b.rejected_logps])
    return (ref - other).abs().max().item(), ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * ref.abs().max().item()


def check_first_batch(scorer, pairs: Sequence[TokenizedPair], output: Path,
                      log: Log = print) -> dict:
    """Compare the scorer's layouts and head with padded + plain on the longest CHECKED_PAIRS of
    `pairs` (the first batch); fall back if they differ.

    Returns the record written to `output / layout_check.json`.
    """
    speed, model = scorer.speed, scorer.policy
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    candidates = [lay for lay in scorer.layouts if lay != "padded"]
    chunked = head_is_plain(model) if scorer.chunked_head is None else scorer.chunked_head
    head = "chunked" if chunked else "plain"
    record = {"model_type": model_type, "layouts": list(scorer.layouts), "lm_head": head, "checked": [],
              "fallback": False}
    if not candidates and head == "plain" or not pairs:
        return _write(record, output)
    pairs = sorted(pairs, key=lambda p: -(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)))
    pairs = pairs[:CHECKED_PAIRS]
    started, started_cpu = time.perf_counter(), time.process_time()
    was_training = model.training
    model.eval()
    try:
        chunk = speed.lm_head_chunk or None
        plain = _fp32_logps(model, pairs, scorer, "padded", False, None)
        for layout in candidates or ["padded"]:
            record["checked"].append(_check(model, pairs, scorer, layout, plain, chunk))
    finally:
        model.train(was_training)
    # Its cost, for the benchmark (CPU seconds move less than wall time on a shared machine).
    record["seconds"] = round(time.perf_counter() - started, 4)
    record["cpu_seconds"] = round(time.process_time() - started_cpu, 4)
    failed = [c for c in record["checked"] if not c["exact"]]
    if failed:
        _fall_back(scorer, record, failed[0], model_type, head, log)
    return _write(record, output)


def _check(model, pairs, scorer, layout: str, plain: PairLogps, chunk) -> dict:
    """One layout's entry: its largest gap to padded + plain, the tolerance, and whether it is within."""
    try:
        got = _fp32_logps(model, pairs, scorer, layout, scorer.chunked_head, chunk)
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:  # a layout the model cannot run
        why = first_line(exc)
        return {"layout": layout, "gap": None, "error": f"{type(exc).__name__}: {why}", "exact": False}
    gap, tolerance = _gap(plain, got)
    return check_router_gap({"layout": layout, "gap": gap, "tolerance": tolerance, "exact": gap <= tolerance},
                            plain.router, got.router)


def _fall_back(scorer, record: dict, failed: dict, model_type: str, head: str, log) -> None:
    """Padded + plain under auto (one log line); a stop with the gap for an explicit choice."""
    speed = scorer.speed
    gap = f"{failed['gap']:.3g}" if failed["gap"] is not None else f"an error ({failed['error']})"
    where = f"the {failed['layout']} layout with the {head} LM head"
    if speed.layout not in ("auto", "padded") or speed.lm_head == "chunked":
        raise DpokitError(f"--layout {speed.layout} --lm-head {speed.lm_head} is not exact for {model_type}: "
                          f"on the first batch {where} differs from the padded forward by {gap}; "
                          "use --layout padded --lm-head plain")
    scorer.layouts, scorer.chunked_head = ["padded"], False
    record.update(fallback=True, layouts=["padded"], lm_head="plain")
    log(f"layout check: {model_type}: {where} differs from the padded forward by {gap} on the first batch; "
        "using --layout padded --lm-head plain")


def _write(record: dict, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "layout_check.json", json.dumps(record, indent=1) + "\n")
    return record
