"""Shared fixtures: a tiny Llama model folder and toy preference files, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpokit.demo.toy import make_pairs, save_tiny_model, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(folder / "train.jsonl", make_pairs(64, seed=1))
    held_out = write_jsonl(folder / "eval.jsonl", make_pairs(16, seed=2))
    return train, held_out


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, toy_data, tmp_path_factory) -> Path:
    """A short DPO run on the toy task (with held-out evaluation), for sampling and evaluation tests."""
    from dpokit.config import build_config
    from dpokit.train.loop import train

    train_file, eval_file = toy_data
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = build_config({"model": {"model": str(tiny_model_dir)},
                        "data": {"data": str(train_file), "eval_data": str(eval_file), "max_length": 32},
                        "train": {"output": str(out), "learning_rate": 1e-3, "batch_size": 8, "max_steps": 16,
                                  "warmup_steps": 2, "eval_every": 8, "progress": "off"}})
    train(cfg, log=lambda _: None)
    return out
