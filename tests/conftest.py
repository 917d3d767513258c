"""Shared fixtures: a tiny Llama model folder and toy preference files, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.families import family_pairs
from helpers.toy import build_tokenizer, make_pairs, save_tiny_model, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"
# A few real rows carried with the tests (tests/data/SOURCES.md), so a bare clone runs the tests that need only those.
TEST_DATA = Path(__file__).resolve().parent / "data"


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


# Losses and log-probs of two runs that differ only in float reduction order agree closely: Adam
# amplifies float noise only in coordinates whose gradient is near zero, which by that token barely
# move the loss. 1e-5 is ~100 float32 roundoffs of a loss near ln 2, accumulated over a few steps.
LOSS_ATOL = 1e-5
# Weights are another matter: Adam turns float noise in a near-zero gradient into a step of up to
# the learning rate, so no elementwise tolerance is safe for all coordinates (a plain 1e-5
# comparison fails on another CPU). Those noise coordinates are rare; a real difference in the
# gradients (another data order, another learning rate, a wrong loss) moves nearly all
# coordinates by about the learning rate, far beyond WEIGHT_ATOL.
WEIGHT_ATOL = 1e-5
NOISE_SHARE = 1 / 1000


def assert_same_training(a: dict, b: dict, *, losses: tuple[list, list] | None = None,
                         atol: float = WEIGHT_ATOL) -> None:
    """Two AdamW runs that should agree up to float reduction order: the per-step `losses` (two
    lists, when given) within LOSS_ATOL, and all but NOISE_SHARE of the weight coordinates within
    `atol`. A run with other gradients fails both (`test_train_settings.py` shows it)."""
    if losses is not None:
        first, second = losses
        assert len(first) == len(second) and all(
            abs(x - y) <= LOSS_ATOL for x, y in zip(first, second, strict=True)), (first, second)
    assert a.keys() == b.keys()
    off = total = 0
    for name in a:
        off += int(((a[name].float() - b[name].float()).abs() > atol).sum())
        total += a[name].numel()
    assert off <= total * NOISE_SHARE, f"{off} of {total} coordinates differ by more than {atol}"


@pytest.fixture
def same_training():
    """`assert_same_training`, for tests that compare two training runs after AdamW steps."""
    return assert_same_training
