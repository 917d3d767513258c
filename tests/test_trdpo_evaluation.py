"""TR-DPO evaluations name their reference and agree (issue 28, finding 4): training's `eval_*` are
against the synced reference (TRL's meaning), `dpokit evaluate` gives those same figures as
`preferences_synced_reference` beside `preferences` against the starting model, and a frontier
row's held-out columns are against the frontier's reference, the one its KL is against."""

from __future__ import annotations

import csv
import json

import pytest

from dpokit.cli import main
from helpers.toy import make_pairs, write_jsonl

FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
# τ = 3 over 7 steps, soft: the final reference (synced after step 6) is neither the start nor the policy.
TR_DPO = ["--sync-reference-steps", "3", "--sync-reference-alpha", "0.5", "--max-steps", "7"]
COMMON = ["--max-length", "32", "--batch-size", "8", "--learning-rate", "1e-3", "--progress", "off"]


def _close(a: float, b: float) -> bool:
    # Same pairs, weights and reference; the batches may be cut differently: float32 summation order.
    return a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def tr_dpo_run(tiny_model_dir, toy_data, tmp_path_factory):
    train_file, eval_file = toy_data
    run = tmp_path_factory.mktemp("trdpo") / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train_file), "--eval-data", str(eval_file),
                 "--output", str(run), *TR_DPO, *COMMON]) == 0
    return run


def _evaluate(run, data, tmp_path, *extra) -> dict:
    out = tmp_path / "evaluation.json"
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_train_and_evaluate_give_the_same_figures_against_the_same_reference(tr_dpo_run, tiny_model_dir, toy_data,
                                                                             tmp_path):
    _, eval_file = toy_data
    final = [json.loads(line) for line in (tr_dpo_run / "metrics.jsonl").read_text().splitlines()][-1]
    result = _evaluate(tr_dpo_run, eval_file, tmp_path)
    synced = result["preferences_synced_reference"]
    assert "synced reference after step 6" in synced["reference"]
    for name in FIGURES:
        assert _close(synced[name], final[f"eval_{name}"]), name
    start = result["preferences"]
    assert start["reference"] == result["reference"] == str(tiny_model_dir)  # the starting model, as the KL's
    assert abs(start["rewards/margins"] - synced["rewards/margins"]) > 1e-3  # two references, two figures


def test_an_explicit_reference_model_is_the_only_one(tr_dpo_run, tiny_model_dir, toy_data, tmp_path):
    _, eval_file = toy_data
    result = _evaluate(tr_dpo_run, eval_file, tmp_path, "--reference-model", str(tiny_model_dir))
    assert "preferences_synced_reference" not in result
    assert result["preferences"]["reference"] == str(tiny_model_dir)


def test_a_frontier_row_is_against_the_frontiers_reference(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(3, seed=3)])
    out = tmp_path / "sweep"
    assert main(["sweep", "--beta", "0.1", "--model", str(tiny_model_dir), "--data", str(train_file),
                 "--eval-data", str(eval_file), "--output", str(out), "--prompts", str(prompts), "--judge",
                 "sentiment", "--num-samples", "1", "--max-new-tokens", "4", *TR_DPO, *COMMON]) == 0
    [row] = [r for r in csv.DictReader((out / "frontier.csv").open()) if r["run"] != "reference"]
    start = _evaluate(out / row["run"], eval_file, tmp_path)["preferences"]  # against the starting model
    assert _close(float(row["eval_reward_margin"]), start["rewards/margins"])
    assert _close(float(row["eval_reward_accuracy"]), start["rewards/accuracies"])
