"""--report-to: every metrics.jsonl figure reaches TensorBoard, MLflow, trackio and wandb (read back
with each one's own storage format), a failing tracker never stops training, a missing one is
refused before training starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit import cli, trackers
from dpokit.config import build_config
from dpokit.errors import DpokitError
from helpers.toy import make_pairs, write_jsonl
from helpers.tracker_readers import (
    mlflow_metrics,
    tensorboard_images,
    tensorboard_scalars,
    trackio_metrics,
    wandb_offline_history,
)

ALL = "tensorboard,mlflow,trackio,wandb"


@pytest.fixture
def offline_trackers(monkeypatch, tmp_path):
    """Each tracker's local store, kept inside the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tracker name: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(trackers.tracker_key(key), {})[record["step"]] = float(value)
    return out


def _assert_same(logged: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], rel: float) -> None:
    for key, by_step in expected.items():
        assert key in logged, key
        assert sorted(logged[key]) == sorted(by_step), key
        for step, value in by_step.items():
            assert math.isclose(logged[key][step], value, rel_tol=rel, abs_tol=rel), (key, step)


@pytest.mark.slow
def test_a_cli_run_logs_every_metric_to_all_four_trackers(offline_trackers, tiny_model_dir, capsys):
    tmp = offline_trackers
    data = write_jsonl(tmp / "pairs.jsonl", make_pairs(24, seed=4))
    held_out = write_jsonl(tmp / "held_out.jsonl", make_pairs(8, seed=5))
    run = tmp / "run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(held_out),
                     "--output", str(run), "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
                     "--max-length", "32", "--progress", "off", "--report-to", ALL])
    assert code == 0
    expected = _expected(run)
    assert {"train/loss", "train/rewards/accuracies", "eval/loss"} <= set(expected)
    _assert_same(tensorboard_scalars(run / "tensorboard"), expected, rel=1e-6)  # stored as float32
    assert "training_curves" in tensorboard_images(run / "tensorboard")
    metrics, params, images = mlflow_metrics(run / "mlruns")
    _assert_same(metrics, expected, rel=1e-12)
    assert params["loss.beta"] == "0.1" and images == ["images/training_curves.png"]
    _assert_same(trackio_metrics("dpokit", run.name), expected, rel=1e-12)
    _assert_same(wandb_offline_history(run), expected, rel=1e-12)


class _FullDisk:
    name = "tensorboard"

    def __init__(self):
        self.calls = 0

    def log_metrics(self, values, step):
        self.calls += 1
        raise OSError(28, "No space left on device")

    def finish(self):
        raise AssertionError("a dropped tracker is not called again")


def test_a_failing_tracker_warns_once_and_is_dropped():
    lines, broken = [], _FullDisk()
    group = trackers.Trackers([broken], lines.append)
    for step in (1, 2, 3):
        group.log_record({"step": step, "loss": 0.5})
    group.finish()
    assert broken.calls == 1
    assert len(lines) == 1 and "No space left on device" in lines[0] and "metrics.jsonl keeps" in lines[0]


def test_a_missing_tracker_library_is_refused_before_training(monkeypatch, tiny_model_dir, tmp_path, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=4))
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                     "--max-steps", "1", "--report-to", "tensorboard,mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "dpokit: error: --report-to mlflow needs the mlflow package: pip install 'dpokit[mlflow]'"
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("value, message", [("tensorbord", "unknown tracker tensorbord"),
                                            ("wandb,wandb", "list each tracker once"),
                                            ("none,wandb", "none cannot be combined")])
def test_report_to_values_are_checked_with_the_config(value, message):
    with pytest.raises(DpokitError, match=message):
        build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"},
                      "train": {"output": "o", "report_to": value}})
    assert build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"},
                         "train": {"output": "o", "report_to": "wandb, mlflow"}}).train.report_to == ("wandb", "mlflow")
    assert trackers.chosen_trackers(("none",)) == ()


def test_metric_names_follow_transformers():
    assert trackers.tracker_key("rewards/margins") == "train/rewards/margins"
    assert trackers.tracker_key("eval_rewards/accuracies") == "eval/rewards/accuracies"


def test_every_tracker_the_config_accepts_has_a_library():
    from dpokit.config.choices import TRACKERS

    assert set(trackers._LIBRARIES) == set(TRACKERS)
