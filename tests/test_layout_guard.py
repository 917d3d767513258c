"""The first-batch layout check: a layout the matrix does not know to be wrong is caught at run time.

A model whose attention the layouts do not reproduce is simulated by hiding Mistral's sliding
window from the mask builder (what every sliding-window model got before masks carried windows),
and by letting Bloom's ALiBi through to a packed forward it cannot run.
"""

import json

import pytest
import torch

import dpokit.model.attention
import dpokit.model.capability
from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.model.layout_guard import check_first_batch
from dpokit.scoring import PairScorer
from helpers.families import build_family


def _scorer(model, tok, layout="auto", lm_head="auto"):
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"},
                        "train": {"output": "o", "batch_size": 4},
                        "speed": {"layout": layout, "lm_head": lm_head, "pack_length": 24}})
    return PairScorer(model, loss=cfg.loss, speed=cfg.speed, dtype=cfg.model.dtype, pad_id=tok.pad_token_id,
                      device=torch.device("cpu"))


def _hide_window(monkeypatch):
    monkeypatch.setattr(dpokit.model.capability, "applied_windows", lambda model: {dpokit.model.attention.FULL: None})


def test_exact_layouts_are_kept_and_recorded(tok, pairs, tmp_path):
    scorer = _scorer(build_family("mistral", tok, "sdpa"), tok)
    lines = []
    record = check_first_batch(scorer, pairs, tmp_path, lines.append)
    assert scorer.layouts == ["packed", "prefix-shared"] and scorer.chunked_head is None
    assert lines == [] and record["fallback"] is False
    assert [c["layout"] for c in record["checked"]] == ["packed", "prefix-shared"]
    assert all(c["exact"] and c["gap"] <= 1e-5 for c in record["checked"])
    assert json.loads((tmp_path / "layout_check.json").read_text()) == record


def test_a_wrong_layout_under_auto_falls_back_to_padded_plain_with_one_line(tok, pairs, tmp_path, monkeypatch):
    _hide_window(monkeypatch)
    scorer = _scorer(build_family("mistral", tok, "sdpa"), tok)
    lines = []
    record = check_first_batch(scorer, pairs, tmp_path, lines.append)
    assert scorer.layouts == ["padded"] and scorer.chunked_head is False
    assert len(lines) == 1 and "mistral" in lines[0] and "--layout padded --lm-head plain" in lines[0]
    gap = record["checked"][0]["gap"]
    assert gap > 1e-3 and f"{gap:.3g}" in lines[0]
    saved = json.loads((tmp_path / "layout_check.json").read_text())
    assert saved["fallback"] is True and saved["layouts"] == ["padded"] and saved["lm_head"] == "plain"


def test_a_wrong_layout_asked_for_explicitly_stops_with_the_gap(tok, pairs, tmp_path, monkeypatch):
    _hide_window(monkeypatch)
    scorer = _scorer(build_family("mistral", tok, "sdpa"), tok, layout="packed")
    with pytest.raises(DpokitError, match=r"--layout packed .* is not exact for mistral: .* differs .* by \d"):
        check_first_batch(scorer, pairs, tmp_path, print)


def test_a_layout_the_model_cannot_run_falls_back(tok, pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(dpokit.model.attention, "layout_blocker", lambda model, layout: None)
    scorer = _scorer(build_family("bloom", tok, "eager"), tok)
    scorer.layouts = ["packed"]
    lines = []
    record = check_first_batch(scorer, pairs, tmp_path, lines.append)
    assert scorer.layouts == ["padded"] and len(lines) == 1 and "an error (ValueError" in lines[0]
    assert record["checked"][0]["gap"] is None


def test_a_head_that_is_not_exact_falls_back_or_stops(tok, pairs, tmp_path):
    # Gemma 2 soft-caps its logits after the head (a low cap, so it shows on a random model):
    # the chunked head there is wrong. Under auto the head probe never picks it; forced, the
    # check catches it.
    model = build_family("gemma2", tok, "eager")
    model.config.final_logit_softcapping = 0.5
    scorer = _scorer(model, tok, layout="padded")
    scorer.chunked_head = True
    lines = []
    check_first_batch(scorer, pairs, tmp_path, lines.append)
    assert scorer.chunked_head is False and "the padded layout with the chunked LM head" in lines[0]
    with pytest.raises(DpokitError, match="--lm-head chunked is not exact for gemma2"):
        check_first_batch(_scorer(model, tok, layout="padded", lm_head="chunked"), pairs, tmp_path, print)
