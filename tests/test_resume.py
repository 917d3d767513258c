"""Never lose a run: bitwise resume after SIGKILL, SIGTERM, crashes mid-save, NaNs, disk full."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.losses import LossPlan
from dpokit.train import checkpoint as ckpt_module
from dpokit.train import loop
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.loop import train
from helpers.toy import make_pairs, write_jsonl

STEPS = 12


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> Path:
    # 40 pairs, 8 per step: 5 steps per epoch, so 12 steps cross two epoch boundaries.
    return write_jsonl(tmp_path_factory.mktemp("resume") / "d.jsonl", make_pairs(40, seed=11))


def _args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output", out, "--max-steps", STEPS,
            "--batch-size", 4, "--gradient-accumulation-steps", 2, "--learning-rate", 1e-3,
            "--max-length", 32, "--warmup-steps", 2, "--progress", "off", *extra]


def _cmd(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "dpokit", *map(str, args)], env


def _run(args):
    cmd, env = _cmd(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, resume_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _run(_args(tiny_model_dir, resume_data, out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[str, torch.Tensor]:
    return _weights(uninterrupted_run)


def _drifts(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["logps/chosen_drift"], r["logps/rejected_drift"]) for r in records if "logps/chosen" in r]


def _wait_for_checkpoint(out: Path, min_step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list_checkpoints(out)
        if found and int(found[-1].name.split("-")[1]) >= min_step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {min_step}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(
    tiny_model_dir, resume_data, uninterrupted, tmp_path, seed
):
    rng = random.Random(seed)
    out = tmp_path / "run"
    cmd, env = _cmd(_args(tiny_model_dir, resume_data, out, "--save-every", 1))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_checkpoint(out, rng.randint(1, STEPS - 4), proc)
    time.sleep(rng.uniform(0.0, 0.05))  # land anywhere: mid-step or mid-save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # it really was cut short

    resumed = _run(_args(tiny_model_dir, resume_data, out, "--save-every", 1, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    _assert_bitwise_equal(_weights(out), uninterrupted)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == STEPS  # one run's metrics, no duplicates
    assert len(set(steps)) == len(steps)


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_continues(tiny_model_dir, resume_data, uninterrupted, uninterrupted_run,
                                                       tmp_path):
    out = tmp_path / "run"
    cmd, env = _cmd(_args(tiny_model_dir, resume_data, out, "--save-every", 2))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_checkpoint(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    message = proc.stderr.read().strip().splitlines()
    assert len(message) == 1 and "SIGTERM" in message[0] and "--resume auto" in message[0]
    assert "Traceback" not in message[0]
    resumed = _run(_args(tiny_model_dir, resume_data, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    _assert_bitwise_equal(_weights(out), uninterrupted)
    # The drifts after the resume still count from step 1's log-probs (the history in the checkpoint).
    drifts = _drifts(out)
    assert [d[0] for d in drifts] == list(range(1, STEPS + 1)) and drifts == _drifts(uninterrupted_run)
    assert drifts[0][1:] == (0.0, 0.0) and drifts[-1][1] != 0.0


def test_sigterm_in_the_last_step_still_saves_exits_143_and_resume_finishes(
    tiny_model_dir, resume_data, uninterrupted, tmp_path, monkeypatch, capsys
):
    real_step = loop.train_step

    def step_then_signal(*args, step, **kwargs):
        outcome = real_step(*args, step=step, **kwargs)
        if step == STEPS:  # the signal lands while the last step runs
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "train_step", step_then_signal)
    assert main([str(a) for a in _args(tiny_model_dir, resume_data, out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"stopped after step {STEPS}" in err and "--resume auto" in err
    assert not (out / "model.safetensors").exists() and int(list_checkpoints(out)[-1].name.split("-")[1]) == STEPS
    monkeypatch.setattr(loop, "train_step", real_step)
    assert main([str(a) for a in _args(tiny_model_dir, resume_data, out, "--resume", "auto")]) == 0
    _assert_bitwise_equal(_weights(out), uninterrupted)


def _config(model_dir, data, out, **train):
    section = {"output": str(out), "max_steps": STEPS, "batch_size": 4, "gradient_accumulation_steps": 2,
               "learning_rate": 1e-3, "warmup_steps": 2, "progress": "off", **train}
    return build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                         "train": section})


def test_crash_during_checkpoint_write_keeps_the_previous_one(
    tiny_model_dir, resume_data, uninterrupted, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: write half a file, then die
            Path(path).write_bytes(b"partial")
            raise RuntimeError("injected crash mid-save")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="injected"):
        train(_config(tiny_model_dir, resume_data, out, save_every=2), log=lambda _: None)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)

    found = list_checkpoints(out)
    assert [p.name for p in found] == ["step-0000002", "step-0000004"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    result = train(_config(tiny_model_dir, resume_data, out, save_every=2, resume="auto"), log=lambda _: None)
    assert result.steps == STEPS
    _assert_bitwise_equal(_weights(out), uninterrupted)


def test_nan_loss_stops_naming_the_step_or_is_skipped(tiny_model_dir, resume_data, tmp_path, monkeypatch):
    real = LossPlan.__call__  # the loss of every micro-batch
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (9, 10):  # both micro-batches of step 5
            return type(out)(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards)
        return out

    monkeypatch.setattr(LossPlan, "__call__", poisoned)
    out = tmp_path / "stop"
    with pytest.raises(DpokitError, match=r"step 5: non-finite loss nan") as err:
        train(_config(tiny_model_dir, resume_data, out, save_every=2), log=lambda _: None)
    assert "step-0000004" in str(err.value)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    good = _weights_of_checkpoint(list_checkpoints(out)[-1])
    assert all(torch.isfinite(t).all() for t in good.values())

    calls["n"] = 0
    result = train(_config(tiny_model_dir, resume_data, tmp_path / "skip", skip_nonfinite=True),
                   log=lambda _: None)
    assert result.nonfinite_skipped == 1
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "skip").values())


def _weights_of_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(
    tiny_model_dir, resume_data, tmp_path, monkeypatch
):
    real = ckpt_module.save_file
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(DpokitError, match="no space left on device; the last good checkpoint .*step-0000003"):
        train(_config(tiny_model_dir, resume_data, out, save_every=3), log=lambda _: None)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000003"]


def test_resume_refuses_a_different_config_or_data(tiny_model_dir, resume_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model_dir, resume_data, out, max_steps=2), log=lambda _: None)
    with pytest.raises(DpokitError, match=r"--beta differs \(checkpoint: 0.1, now: 0.3\)"):
        cfg = _config(tiny_model_dir, resume_data, out, max_steps=2, resume="auto")
        cfg.loss.beta = 0.3
        train(cfg, log=lambda _: None)
    other = write_jsonl(tmp_path / "other.jsonl", make_pairs(40, seed=99))
    with pytest.raises(DpokitError, match="--data differs"):
        train(_config(tiny_model_dir, other, out, max_steps=2, resume="auto"), log=lambda _: None)
    edited = tmp_path / "edited.jsonl"
    edited.write_text(resume_data.read_text())
    train(_config(tiny_model_dir, edited, tmp_path / "run2", max_steps=2), log=lambda _: None)
    edited.write_text(resume_data.read_text().replace("great", "fun"))  # same path, new content
    with pytest.raises(DpokitError, match="training data .* differs from the checkpoint"):
        train(_config(tiny_model_dir, edited, tmp_path / "run2", max_steps=2, resume="auto"), log=lambda _: None)
    with pytest.raises(DpokitError, match="holds another dpokit run; pass --resume auto"):
        train(_config(tiny_model_dir, resume_data, out, max_steps=2), log=lambda _: None)
