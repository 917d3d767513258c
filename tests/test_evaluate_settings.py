"""`dpokit evaluate --data` reads and tokenizes pairs with the run's own data settings by default."""

from __future__ import annotations

import json

import pytest

from dpokit.cli import main
from dpokit.config import build_config
from dpokit.train.loop import train


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, toy_data, tmp_path_factory):
    train_file, eval_file = toy_data
    out = tmp_path_factory.mktemp("short") / "run"
    cfg = build_config({"model": {"model": str(tiny_model_dir)},
                        "data": {"data": str(train_file), "eval_data": str(eval_file), "max_length": 7},
                        "train": {"output": str(out), "learning_rate": 1e-3, "batch_size": 8, "max_steps": 3,
                                  "progress": "off"}})
    result = train(cfg, log=lambda _: None)
    return out, result.final_eval


def _evaluate(capsys, *args):
    assert main(["evaluate", *map(str, args), "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)["preferences"], captured.err


def test_evaluate_uses_the_run_s_data_settings(short_run, toy_data, capsys):
    run, final_eval = short_run
    figures, log = _evaluate(capsys, "--model", run, "--data", toy_data[1])
    assert "max_length 7 (the run's)" in log and "truncation_mode keep_end (the run's)" in log
    assert figures["loss"] == pytest.approx(final_eval["eval_loss"], abs=1e-5)
    assert figures["rewards/margins"] == pytest.approx(final_eval["eval_rewards/margins"], abs=1e-5)


def test_evaluate_takes_train_s_data_flags_to_override(short_run, toy_data, capsys):
    run, final_eval = short_run
    figures, log = _evaluate(capsys, "--model", run, "--data", toy_data[1], "--max-length", 32,
                             "--truncation-mode", "keep_start", "--min-response-share", 0.5)
    assert "max_length 32 (given)" in log and "truncation_mode keep_start (given)" in log
    assert "min_response_share 0.5 (given)" in log and "data_format auto (the run's)" in log
    assert figures["loss"] != pytest.approx(final_eval["eval_loss"], abs=1e-5)  # longer pairs: other figures
