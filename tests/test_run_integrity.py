"""Numbers users can trust around a run: evaluation cadence, resume refusals, the run-folder lock,
and a reference pass that covers only the pairs the run uses."""

from __future__ import annotations

import json

import pytest

from dpokit.config import build_config
from dpokit.demo.toy import make_pairs, write_jsonl
from dpokit.errors import DpokitError
from dpokit.train.loop import train


def _config(model_dir, data, out, eval_data=None, **train_opts):
    train_section = {"output": str(out), "learning_rate": 1e-3, "progress": "off", "batch_size": 4, **train_opts}
    return build_config({"model": {"model": str(model_dir)},
                         "data": {"data": str(data), "eval_data": eval_data and str(eval_data), "max_length": 32},
                         "train": train_section})


def test_evaluations_keep_their_own_cadence(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    cfg = _config(tiny_model_dir, train_file, tmp_path / "run", eval_file, max_steps=8, log_every=2, eval_every=3)
    train(cfg, log=lambda _: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 3, 6, 8]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6, 8]
