"""Issue 35 for the commands that train several runs in one folder: `sweep --overwrite`, `online
--overwrite` and the demo reusing an earlier demo's folder keep what the folder held until their first
run's first checkpoint, and put it back when they fail before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpokit.config import JudgeConfig, OnlineConfig, SamplingConfig, build_config
from dpokit.errors import DpokitError
from dpokit.experiments.demo.sentiment import DemoSettings, run_demo
from dpokit.experiments.online import run_online
from dpokit.experiments.sweep import run_sweep
from dpokit.train import loop
from dpokit.train.loop import train
from helpers.fast_frontier import fast_frontier
from helpers.folders import leftovers, snapshot
from helpers.toy import make_pairs, write_jsonl

BAD_LORA = {"lora_r": 4, "lora_target_modules": "foo_proj"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("owx-data") / "d.jsonl", make_pairs(8, seed=4))


@pytest.fixture(scope="module")
def a_run(tiny_model_dir, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("owx-run") / "run"
    train(_base(tiny_model_dir, pairs, out), log=lambda _: None)
    return out


def _base(model, data, out, **sections):
    options = {"model": {"model": str(model)}, "data": {"data": str(data), "max_length": 32},
               "train": {"output": str(out), "max_steps": 1, "batch_size": 4, "progress": "off"}}
    for name, values in sections.items():
        options.setdefault(name, {}).update(values)
    return build_config(options)


def _old_root(folder: Path, run: Path, *files: str) -> dict[str, bytes]:
    """An earlier experiment's folder: a trained run and the experiment's own files."""
    shutil.copytree(run, folder / "sigmoid-beta0.1")
    for name in files:
        (folder / name).write_text(f"the earlier {name}\n")
    return snapshot(folder)


def test_a_failed_sweep_overwrite_puts_the_earlier_sweep_back(tiny_model_dir, pairs, a_run, tmp_path, monkeypatch):
    fast_frontier(monkeypatch)
    root = tmp_path / "sweep"
    before = _old_root(root, a_run, "frontier.csv", "sweep.json")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    judging = JudgeConfig(prompts=str(prompts), judge="sentiment")
    base = _base(tiny_model_dir, pairs, root, train={"overwrite": True}, lora=BAD_LORA)
    with pytest.raises(DpokitError, match="foo_proj"):
        run_sweep(base, [0.1, 0.5], ["sigmoid"], judging, SamplingConfig(), log=lambda _: None)
    assert snapshot(root) == before and leftovers(root) == []
    # A second run failing after the first one's checkpoint: the new sweep (with its first run) stays.
    steps = []

    def second_run_fails(*args, **kwargs):
        steps.append(1)
        if len(steps) > 1:
            raise RuntimeError("out of memory")
        return real_step(*args, **kwargs)

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", second_run_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(_base(tiny_model_dir, pairs, root, train={"overwrite": True}), [0.1, 0.5], ["sigmoid"], judging,
                  SamplingConfig(), log=lambda _: None)
    assert leftovers(root) == [] and not (root / "sweep.json").exists()  # the earlier sweep's files are gone
    assert (root / "frontier.csv").read_text().startswith("run,")  # the new sweep's, written after its first run
    assert (root / "sigmoid-beta0.1" / "model.safetensors").is_file() and (root / "sigmoid-beta0.5").is_dir()


def test_a_failed_online_overwrite_puts_the_earlier_run_back(tiny_model_dir, pairs, a_run, tmp_path, monkeypatch):
    fast_frontier(monkeypatch)
    root = tmp_path / "online"
    before = _old_root(root, a_run, "online_progress.json", "online.json")
    base = _base(tiny_model_dir, "unused.jsonl", root, train={"overwrite": True}, lora=BAD_LORA)
    with pytest.raises(DpokitError, match="foo_proj"):  # round 1: sampled, then its training refuses the target
        run_online(base, [r["prompt"] for r in make_pairs(4, seed=5)], OnlineConfig(rounds=1, samples_per_prompt=3),
                   JudgeConfig(judge="sentiment"), SamplingConfig(num_samples=1, max_new_tokens=4), log=lambda _: None)
    assert snapshot(root) == before and leftovers(root) == []


def test_a_failed_demo_puts_the_earlier_demo_back(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    (out / "runs" / "dpo-beta0.5").mkdir(parents=True)
    (out / "runs" / "dpo-beta0.5" / "model.safetensors").write_bytes(b"an earlier demo's model")
    (out / "demo.log").write_text("an earlier demo\n")
    (out / "summary.json").write_text(json.dumps({"runs": []}))
    before = snapshot(out)
    monkeypatch.setenv("DPOKIT_FAULT", "reference-pass=raise")  # the first run's reference pass runs out of memory
    tiny = DemoSettings(train_prompts=4, eval_prompts=2, samples_per_prompt=2, eval_samples=1, max_new_tokens=4,
                        betas=(0.3,), steps=1, batch_size=4, sft_steps=(1,), online_rounds=1, threads=1)
    with pytest.raises(MemoryError):
        run_demo(tiny, out, online=False, progress=False, log=lambda _: None)
    assert snapshot(out) == before and leftovers(out) == []
