"""Issue 35: `--overwrite` never loses the previous run. Every check that needs no training runs before
the folder is touched; the new run is built beside the old one and swapped in whole; the old one stays
until the new run's first checkpoint, and comes back after any failure before it (a SIGKILL too: the
next dpokit command on the folder puts it back). Also issue 36.7: what --overwrite deletes is named
before it is suggested. The lock file's content (the holder's pid) is the only byte that may change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit import cli
from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.folder_swap import MARKER, locked_folder, swap_path
from dpokit.train import loop
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.loop import train
from helpers.folders import leftovers, snapshot
from helpers.toy import make_pairs, write_jsonl


def _options(model, data, out, **train_options) -> dict:
    return {"model": {"model": str(model)}, "data": {"data": str(data), "max_length": 32},
            "train": {"output": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3,
                      "progress": "off", **train_options}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ow-data") / "d.jsonl", make_pairs(16, seed=4))


@pytest.fixture(scope="module")
def old_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    """A finished run with a checkpoint, a model, metrics, a card: what a user does not want to lose."""
    out = tmp_path_factory.mktemp("ow-old") / "run"
    train(build_config(_options(tiny_model_dir, data, out)), log=lambda _: None)
    return out


@pytest.fixture
def run(old_run, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the old run to write over, and its bytes."""
    target = tmp_path / "run"
    shutil.copytree(old_run, target)
    return target, snapshot(target)


def _overwrite(model, pairs, out, **options) -> None:
    cfg = _options(model, pairs, out, overwrite=True)
    for section, values in options.items():
        cfg.setdefault(section, {}).update(values)
    train(build_config(cfg), log=lambda _: None)


def _assert_intact(out: Path, before: dict[str, bytes]) -> None:
    assert snapshot(out) == before
    assert leftovers(out) == [] and not (out / MARKER).exists()


def test_a_bad_lora_target_leaves_the_old_run(tiny_model_dir, data, run):
    out, before = run
    with pytest.raises(DpokitError, match="foo_proj"):
        _overwrite(tiny_model_dir, data, out, lora={"lora_r": 4, "lora_target_modules": "foo_proj"})
    _assert_intact(out, before)


def test_a_model_that_fails_to_load_leaves_the_old_run(tiny_model_dir, data, run, tmp_path):
    out, before = run
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DpokitError, match="damaged"):
        _overwrite(broken, data, out)
    _assert_intact(out, before)


def test_data_that_fails_late_leaves_the_old_run(tiny_model_dir, data, run, tmp_path):
    out, before = run
    bad_tail = tmp_path / "bad_tail.jsonl"
    bad_tail.write_text(data.read_text() + "{oops\n")  # read to the end before it fails
    with pytest.raises(DpokitError, match="bad_tail.jsonl"):
        _overwrite(tiny_model_dir, bad_tail, out)
    _assert_intact(out, before)
    with pytest.raises(DpokitError, match="missing.jsonl"):
        _overwrite(tiny_model_dir, data, out, data={"eval_data": str(tmp_path / "missing.jsonl")})
    _assert_intact(out, before)


def test_a_tokenizer_without_a_chat_template_leaves_the_old_run(tiny_model_dir, run, tmp_path):
    out, before = run
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": "the film"}], "chosen": [{"role": "assistant", "content": "great"}],
         "rejected": [{"role": "assistant", "content": "dull"}]}] * 4)
    with pytest.raises(DpokitError, match="needs a chat template"):
        _overwrite(tiny_model_dir, chat, out)
    _assert_intact(out, before)


def test_out_of_memory_in_the_reference_pass_leaves_the_old_run(tiny_model_dir, data, run, monkeypatch):
    out, before = run
    monkeypatch.setenv("DPOKIT_FAULT", "reference-pass=raise")
    with pytest.raises(MemoryError):
        _overwrite(tiny_model_dir, data, out)
    _assert_intact(out, before)


def test_a_failure_before_the_first_checkpoint_brings_the_old_run_back(tiny_model_dir, data, run, monkeypatch):
    out, before = run

    def failing_step(*args, **kwargs):  # the new run is in the folder now, the old one beside it
        assert (out / MARKER).exists() and swap_path(out).is_dir()
        raise RuntimeError("out of memory in the backward pass")

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="backward"):
        _overwrite(tiny_model_dir, data, out)
    _assert_intact(out, before)


def test_the_new_run_replaces_the_old_one_whole(tiny_model_dir, data, run):
    out, before = run
    (out / "adapter_config.json").write_text("{}")  # a file of the old run the new one does not write
    _overwrite(tiny_model_dir, data, out, train={"max_steps": 3})
    assert not (out / "adapter_config.json").exists() and leftovers(out) == []
    assert [p.name for p in list_checkpoints(out)] == ["step-0000003"]
    assert json.loads((out / "layout_check.json").read_text())["model_type"] == "llama"  # the guard's record
    assert any(p.name.startswith("reference-logps-") for p in (out / "reference-cache").iterdir())
    assert not (out / MARKER).exists() and snapshot(out) != before


def test_the_lines_name_what_overwrite_would_delete(tiny_model_dir, data, run, capsys):
    out, _ = run
    base = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--progress", "off"]
    for extra, start in (([], f"--output {out} holds another dpokit run; pass --resume auto to continue it, "
                               "--overwrite to replace it (deleting README.md, checkpoints/, config.json, "),
                         (["--resume", "auto", "--max-length", "64"], "cannot resume from")):
        assert cli.main(base + extra) == 2
        assert capsys.readouterr().err.startswith(f"dpokit: error: {start}")
    shutil.rmtree(out / "checkpoints")
    assert cli.main([*base, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"--resume auto: {out} holds no complete checkpoint to resume from; pass --overwrite to replace it " \
           "(deleting README.md, config.json, dpokit_config.yaml, generation_config.json and " in err


# SIGKILL at each step of the replacement: the folder holds one whole run, the next command settles it.

def _kill_at(fault: str, model, data, out) -> None:
    env = {**os.environ, "DPOKIT_FAULT": fault, "OMP_NUM_THREADS": "1"}
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--overwrite", "--max-steps",
            "3", "--batch-size", "4", "--max-length", "32", "--learning-rate", "0.001", "--progress", "off"]
    done = subprocess.run([sys.executable, "-m", "dpokit", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr


def _listed(out: Path) -> list[str]:
    """What `dpokit runs` shows for the folder (read-only: it settles nothing)."""
    done = subprocess.run([sys.executable, "-m", "dpokit", "runs", str(out), "--json"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [row["run"] for row in json.loads(done.stdout)]


def _settle(out: Path) -> list[str]:
    """What every dpokit command that writes the folder does first."""
    lines: list[str] = []
    with locked_folder(out, log=lines.append):
        pass
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["reference-pass=kill", "swap:before=kill", "swap:after=kill",
                                   "exchange:half=kill,no-rename-exchange=on"])
def test_sigkill_before_the_commit_leaves_the_old_run(fault, tiny_model_dir, data, run):
    out, before = run
    _kill_at(fault, tiny_model_dir, data, out)
    swapped, cut = fault.startswith("swap:after"), fault.startswith("exchange:half")
    # Until settled, `dpokit runs` shows the run the folder stands for: the old one, wherever it waits.
    waits = swap_path(out) if swapped else out.parent / f".{out.name}.dpokit-half" if cut else out
    assert _listed(out) == [str(waits)]
    lines = _settle(out)
    assert snapshot(out) == before and leftovers(out) == [] and not (out / MARKER).exists()
    assert lines == ([f"{out}: restored the run it held before an --overwrite that stopped before the new run's "
                      "first checkpoint"] if swapped else [])


@pytest.mark.slow
def test_sigkill_after_the_commit_leaves_the_new_run(tiny_model_dir, data, run):
    out, before = run
    _kill_at("commit:marker-removed=kill", tiny_model_dir, data, out)
    assert _listed(out) == [str(out)]
    assert _settle(out) == [] and leftovers(out) == []
    new = snapshot(out)
    assert new != before and [p.name for p in list_checkpoints(out)] == ["step-0000003"]
    # The new run is whole: its checkpoint resumes (and only writes the final model it had not saved yet).
    train(build_config(_options(tiny_model_dir, data, out, max_steps=3, resume="auto")), log=lambda _: None)
    assert (out / "model.safetensors").is_file()


# What a killed replacement can leave on disk, built by hand: the reader's view and the settling.

def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_each_state_a_kill_can_leave_reads_and_settles_to_one_run(tmp_path):
    from dpokit.folder_swap import standing

    cases = {
        # name: (what is on disk, where readers find the run, what the folder holds once settled)
        "garbage beside": ({"run": {"new": "n"}, ".run.dpokit-swap": {"old": "o"}}, "run", {"new": "n"}),
        "not committed": ({"run": {"new": "n", MARKER: ""}, ".run.dpokit-swap": {"old": "o"}}, ".run.dpokit-swap",
                          {"old": "o"}),
        "cut after the first rename": ({".run.dpokit-half": {"old": "o"}, ".run.dpokit-swap": {"new": "n", MARKER: ""}},
                                       ".run.dpokit-half", {"old": "o"}),
        "cut before the last rename": ({"run": {"new": "n", MARKER: ""}, ".run.dpokit-half": {"old": "o"}},
                                       ".run.dpokit-half", {"old": "o"}),
        "cut before the last rename, committed": ({"run": {"new": "n"}, ".run.dpokit-half": {"old": "o"}}, "run",
                                                  {"new": "n"}),
    }
    for number, (name, (disk, reader, settled)) in enumerate(cases.items()):
        root = tmp_path / str(number)
        for folder, files in disk.items():
            _folder(root / folder, **files)
        out = root / "run"
        assert standing(out) == root / reader, name
        _settle(out)
        assert snapshot(out) == {file: text.encode() for file, text in settled.items()}, name
        assert leftovers(out) == [], name
