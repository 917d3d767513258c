"""logps/chosen_drift and logps/rejected_drift: the logged log-probs against their first logged value."""

from __future__ import annotations

import json

import pytest

from dpokit import cli
from dpokit.eval.report import CURVE_PANELS
from dpokit.train.metrics_window import add_drift


def test_drift_counts_from_the_first_record_in_the_history():
    history = [{"step": 1, "eval_loss": 0.7},  # an evaluation line has no training log-probs
               {"step": 2, "logps/chosen": -10.0, "logps/rejected": -12.0}]
    record = {"step": 5, "logps/chosen": -10.75, "logps/rejected": -14.5}
    add_drift(record, history)
    assert record["logps/chosen_drift"] == -0.75 and record["logps/rejected_drift"] == -2.5
    first = {"step": 1, "logps/chosen": -3.0, "logps/rejected": -4.0}
    add_drift(first, [])
    assert first["logps/chosen_drift"] == 0.0 and first["logps/rejected_drift"] == 0.0


def test_a_run_logs_drift_and_draws_it(tiny_model_dir, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
                     "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "32",
                     "--progress", "off"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert len(records) == 3
    for r in records:
        for side in ("chosen", "rejected"):
            assert r[f"logps/{side}_drift"] == pytest.approx(r[f"logps/{side}"] - first[f"logps/{side}"], abs=0)
    assert any(r["logps/chosen_drift"] != 0 for r in records[1:])
    assert ["logps/chosen_drift", "logps/rejected_drift"] in CURVE_PANELS.values()
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
