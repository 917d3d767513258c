"""Shared fixtures: a tiny Llama model folder and toy preference files, built offline."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from helpers.families import family_pairs
from helpers.toy import build_tokenizer, make_pairs, save_tiny_model, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"


@pytest.fixture(scope="module")
def tok():
    """The word-level Llama-style tokenizer of the family matrix (helpers/families.py)."""
    return build_tokenizer("word")


@pytest.fixture(scope="module")
def pairs(tok):
    """The family matrix's tokenized pairs (a module may narrow them with its own fixture)."""
    return family_pairs(tok)


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


def adam_drift_bound(lr: float, steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """How far two AdamW runs (no weight decay, learning rate at most `lr`) can put one coordinate
    apart after `steps` steps when its gradient is float noise in both: each step moves it by
    lr·|m̂/√v̂|, and by Cauchy-Schwarz |m̂_t|/√v̂_t ≤ (1−β1)/(1−β1^t) · √(Σ_k (β1²/β2)^k) ·
    √((1−β2^t)/(1−β2)) whatever the gradients; the two runs may move opposite ways (factor 2)."""
    total = 0.0
    for t in range(1, steps + 1):
        geometric = sum((beta1 * beta1 / beta2) ** k for k in range(t))
        total += (1 - beta1) / (1 - beta1**t) * math.sqrt(geometric * (1 - beta2**t) / (1 - beta2))
    return 2 * lr * total


def assert_close_after_adam(a: dict, b: dict, *, lr: float, steps: int, atol: float = 1e-5) -> None:
    """Weights of two AdamW runs that should agree up to float reduction order.

    Adam turns float noise in a near-zero gradient into a step of up to the learning rate, so a
    plain 1e-5 comparison fails on another CPU. Every coordinate must stay within the drift bound
    above, and all but a few (at most 1 in 1000: the noise-gradient coordinates) within `atol`;
    a real difference in the update moves most coordinates, and fails."""
    assert a.keys() == b.keys()
    bound = adam_drift_bound(lr, steps)
    off = total = 0
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert diff.max().item() <= bound, (name, diff.max().item(), bound)
        off += int((diff > atol).sum())
        total += diff.numel()
    assert off <= total / 1000, f"{off} of {total} coordinates differ by more than {atol}"


@pytest.fixture
def adam_close():
    """`assert_close_after_adam`, for tests that compare weights after AdamW steps."""
    return assert_close_after_adam
