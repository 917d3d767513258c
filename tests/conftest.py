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
