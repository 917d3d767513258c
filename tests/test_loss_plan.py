"""A run's loss is compiled once (names, weights, frozen options) and shares one computation of
the log-ratios between the losses it combines; the trainer's scorer compiles it once per run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import dpokit.logratios
import dpokit.losses
from dpokit.config import LossConfig, build_config
from dpokit.losses import compile_loss, preference_loss
from dpokit.scoring import PairScorer
from helpers.families import build_family, family_pairs
from helpers.toy import build_tokenizer


def _inputs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4)]
    lengths = [torch.randint(1, 30, (n,), generator=g).double() for _ in range(2)]
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
             "chosen_lengths", "rejected_lengths")
    return dict(zip(names, [*logps, *lengths], strict=True))


def test_the_plan_holds_parsed_names_weights_and_frozen_options():
    plan = compile_loss(LossConfig(loss="sigmoid,sft", loss_weights="1,0.5", beta=0.2))
    assert plan.names == ("sigmoid", "sft") and plan.weights == (1.0, 0.5) and plan.needs_reference
    assert plan.options.beta == 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.options.beta = 1.0  # type: ignore[misc]
    x = _inputs()
    expected = preference_loss("sigmoid", **x, beta=0.2).losses + 0.5 * preference_loss("sft", **x, beta=0.2).losses
    torch.testing.assert_close(plan(**x).losses, expected)


def test_combined_losses_score_the_log_ratios_once_per_batch(monkeypatch):
    calls = []
    real = dpokit.logratios.score_logratios
    monkeypatch.setattr(dpokit.logratios, "score_logratios", lambda lr, o: calls.append(1) or real(lr, o))
    plan = compile_loss(LossConfig(loss="sigmoid,ipo,hinge", f_divergence="js_divergence"))
    plan(**_inputs())
    assert len(calls) == 2  # chosen and rejected, shared by the three losses


def test_the_scorer_compiles_the_loss_once_for_many_batches(monkeypatch):
    compiled = []
    monkeypatch.setattr(dpokit.losses, "check_loss_config", lambda lo: compiled.append(lo))
    tok = build_tokenizer("word")
    pairs = family_pairs(tok)
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "o"},
                        "loss": {"loss": "simpo,sft", "beta": 2.0}})
    scorer = PairScorer(build_family("llama", tok, "sdpa"), None, loss=cfg.loss, speed=cfg.speed, dtype="fp32",
                        pad_id=tok.pad_token_id, device=torch.device("cpu"))
    metrics = scorer.evaluate(pairs, batch_size=1)
    assert len(pairs) > 1 and len(compiled) == 1 and math.isfinite(metrics["eval_loss"])
