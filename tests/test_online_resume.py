"""`dpokit online --resume auto`: a killed online run (SIGKILL, SIGTERM, a full disk) continues at the
round and step it was in, keeps its finished rounds, and ends as the uninterrupted run does.

CPU fp32 training resumes bitwise (tests/test_resume.py) and sampling is seeded per call, so the
final weights and every figure of online.json are compared exactly. The interrupted runs that
need a real process (SIGKILL, SIGTERM) run in a subprocess pinned to this process's thread count;
everything else runs in this process, like the uninterrupted run it is compared with."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit.experiments.frontier as frontier
from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.experiments.online_progress import OnlineProgress
from dpokit.train.checkpoint import list_checkpoints
from helpers.toy import make_pairs, write_jsonl

STEPS = 6  # per round: 8 prompts give at most 8 pairs, 2 steps of 4 per epoch


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(8, seed=5)])
    held_out = write_jsonl(folder / "heldout.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(4, seed=6)])
    return prompts, held_out


def _args(model, prompt_files, out, *extra) -> list[str]:
    prompts, held_out = prompt_files
    return ["online", "--model", str(model), "--prompts", str(prompts), "--eval-prompts", str(held_out),
            "--judge", "sentiment", "--rounds", "2", "--samples-per-prompt", "4", "--output", str(out),
            "--max-steps", str(STEPS), "--batch-size", "4", "--learning-rate", "1e-3", "--max-new-tokens", "6",
            "--num-samples", "2", "--max-length", "32", "--progress", "off", "--save-every", "1", *map(str, extra)]


def _popen(args: list[str]) -> subprocess.Popen:
    # The same thread count as this process: its float reductions, hence its bits, are the same.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "dpokit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, prompt_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "online"
    assert main(_args(tiny_model_dir, prompt_files, out)) == 0
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_result(out: Path, expected: Path) -> None:
    """Same final weights of every round, same online.json figures (paths aside), same frontier.csv."""
    for number in (1, 2):
        a, b = _weights(out / f"round-{number}"), _weights(expected / f"round-{number}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"round {number}'s weights"
    mine, theirs = (json.loads((folder / "online.json").read_text()) for folder in (out, expected))
    assert mine["points"] == theirs["points"]
    without_paths = lambda rounds: [{k: v for k, v in r.items() if k not in ("pairs_file", "policy_sampled")}  # noqa: E731
                                    for r in rounds]
    assert without_paths(mine["rounds"]) == without_paths(theirs["rounds"])
    assert [r["round"] for r in mine["rounds"]] == [1, 2]
    assert (out / "frontier.csv").read_text() == (expected / "frontier.csv").read_text()
    assert (out / "pairs" / "round-2.jsonl").read_text() == (expected / "pairs" / "round-2.jsonl").read_text()


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _mtimes(out: Path) -> dict[str, int]:
    kept = [out / "round-1" / "model.safetensors", out / "round-1" / "evaluation.json", out / "pairs" / "round-1.jsonl"]
    return {str(p): p.stat().st_mtime_ns for p in kept}


@pytest.mark.slow
def test_sigkill_during_round_2_training_resumes_at_its_step(tiny_model_dir, prompt_files, uninterrupted, tmp_path,
                                                             capsys):
    out = tmp_path / "online"
    proc = _popen(_args(tiny_model_dir, prompt_files, out))
    step = random.Random(0).randint(1, STEPS - 3)
    _wait_for(lambda: any(int(c.name.split("-")[1]) >= step for c in list_checkpoints(out / "round-2")), proc,
              f"round 2's step {step}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "round-2" / "model.safetensors").exists()  # killed mid-training
    before = _mtimes(out)
    capsys.readouterr()

    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", "auto")) == 0
    log = capsys.readouterr().out
    assert "round 1/2: finished before the interruption" in log
    assert "resuming from" in log and "round-2/checkpoints/step-" in log  # round 2 at its step, not from 0
    assert "reusing" in log  # round 2's pairs were not sampled again
    assert _mtimes(out) == before  # round 1 was not redone
    _assert_same_result(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_between_rounds_exits_143_with_one_line_then_resumes(tiny_model_dir, prompt_files, uninterrupted,
                                                                      tmp_path):
    out = tmp_path / "online"
    proc = _popen(_args(tiny_model_dir, prompt_files, out))
    # Round 1's evaluation is written: the signal lands in its report, its bookkeeping or round 2's sampling.
    _wait_for(lambda: (out / "round-1" / "evaluation.json").exists(), proc, "round 1's evaluation")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume auto" in lines[0], stderr
    assert not (out / "round-2" / "model.safetensors").exists()

    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", "auto")) == 0
    _assert_same_result(out, uninterrupted)


@pytest.mark.slow
def test_disk_full_at_round_2_evaluation_is_one_line_and_resume_evaluates_it(
    tiny_model_dir, prompt_files, uninterrupted, tmp_path, monkeypatch, capsys
):
    real = frontier.atomic_write_text

    def full_disk(path, text):
        if Path(path).parent.name == "round-2" and Path(path).name == "evaluation.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    out = tmp_path / "online"
    monkeypatch.setattr(frontier, "atomic_write_text", full_disk)
    assert main(_args(tiny_model_dir, prompt_files, out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no space left on device" in error[0] and "--resume auto" in error[0], error
    assert (out / "round-2" / "model.safetensors").exists() and not (out / "round-2" / "evaluation.json").exists()
    monkeypatch.setattr(frontier, "atomic_write_text", real)

    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", "auto")) == 0
    assert (out / "round-2" / "evaluation.json").is_file()
    _assert_same_result(out, uninterrupted)


@pytest.fixture(scope="module")
def one_round(tiny_model_dir, prompt_files, tmp_path_factory) -> Path:
    """A finished one-round run (kept pristine: tests work on copies)."""
    out = tmp_path_factory.mktemp("one") / "online"
    assert main(_args(tiny_model_dir, prompt_files, out, "--rounds", 1)) == 0
    return out


@pytest.mark.parametrize("change, option", [
    (["--samples-per-prompt", 3], "--samples-per-prompt"), (["--seed", 7], "--seed"),
    (["--pairing", "all"], "--pairing"), (["--beta", 0.5], "--beta"), (["--max-new-tokens", 7], "--max-new-tokens"),
    (["--judge", "my_judges:score"], "--judge"),
])
def test_resume_refuses_changed_settings_naming_the_option(tiny_model_dir, prompt_files, one_round, tmp_path,
                                                           change, option, capsys):
    out = tmp_path / "online"
    shutil.copytree(one_round, out)
    capsys.readouterr()
    args = _args(tiny_model_dir, prompt_files, out, "--rounds", 1, "--resume", "auto", *change)
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and option in error[0], error


def test_resume_refuses_other_prompts_and_a_folder_of_something_else(tiny_model_dir, prompt_files, one_round, tmp_path,
                                                                     capsys):
    out = tmp_path / "online"
    shutil.copytree(one_round, out)
    edited = tmp_path / "prompts.jsonl"
    edited.write_text("".join(reversed(prompt_files[0].read_text().splitlines(keepends=True))))  # same prompts, new order
    assert main(_args(tiny_model_dir, (edited, prompt_files[1]), out, "--rounds", 1, "--resume", "auto")) == 2
    assert "--prompts" in capsys.readouterr().err
    # Without --resume a used folder is refused as before; --resume auto on a folder of something else too.
    assert main(_args(tiny_model_dir, prompt_files, out, "--rounds", 1)) == 2
    assert "holds another dpokit run" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(_args(tiny_model_dir, prompt_files, other, "--resume", "auto")) == 2
    assert "holds files dpokit did not write (notes.txt)" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, prompt_files, out / "round-1", "--resume", "auto")) == 2  # a run, not online's
    assert "no online run to resume" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", str(out / "round-1"))) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_rounds_may_grow_but_not_below_the_finished_ones(tmp_path):
    finished = [{"round": n, "policy_sampled": "m", "pairs_file": "p", "pair_stats": {}, "point": {"run": f"round-{n}"}}
                for n in (1, 2)]
    progress = OnlineProgress(tmp_path, {"--seed": 42}, rounds=[*finished, {**finished[1], "round": 3, "point": None}])
    assert [r["round"] for r in progress.finished_rounds()] == [1, 2]
    for rounds in (2, 3, 5):
        progress.check_rounds(rounds)
    with pytest.raises(DpokitError, match=r"--rounds 1: .* has finished 2 rounds already; give --rounds 2 or more"):
        progress.check_rounds(1)


@pytest.mark.slow
def test_a_finished_run_continues_with_more_rounds(tiny_model_dir, prompt_files, one_round, uninterrupted, tmp_path,
                                                   capsys):
    out = tmp_path / "online"
    shutil.copytree(one_round, out)
    before = _mtimes(out)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", "auto")) == 0  # --rounds 2 now
    assert "round 1/2: finished before the interruption" in capsys.readouterr().out
    assert _mtimes(out) == before
    _assert_same_result(out, uninterrupted)
    # A finished run resumed as it is trains nothing and writes the same online.json again.
    assert main(_args(tiny_model_dir, prompt_files, out, "--resume", "auto")) == 0
    log = capsys.readouterr().out
    assert log.count("finished before the interruption") == 2 and "training " not in log
    _assert_same_result(out, uninterrupted)
