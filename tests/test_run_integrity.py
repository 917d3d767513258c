"""Numbers users can trust around a run: evaluation cadence, resume refusals, the run-folder lock,
and a reference pass that covers only the pairs the run uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors import safe_open

from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.train import loop, setup
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.loop import train
from helpers.toy import make_pairs, save_tiny_model, write_jsonl


def _config(model_dir, data, out, eval_data=None, speed=None, **train_opts):
    train_section = {"output": str(out), "learning_rate": 1e-3, "progress": "off", "batch_size": 4, **train_opts}
    return build_config({"model": {"model": str(model_dir)},
                         "data": {"data": str(data), "eval_data": eval_data and str(eval_data), "max_length": 32},
                         "train": train_section, "speed": speed or {}})


def test_evaluations_keep_their_own_cadence(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    cfg = _config(tiny_model_dir, train_file, tmp_path / "run", eval_file, max_steps=8, log_every=2, eval_every=3)
    train(cfg, log=lambda _: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 3, 6, 8]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6, 8]


def _interrupted_run(model_dir, data, out):
    """A 6-step run whose last checkpoint is removed: `--resume auto` continues from step 3."""
    train(_config(model_dir, data, out, max_steps=6, save_every=3), log=lambda _: None)
    shutil.rmtree(list_checkpoints(out)[-1])
    return _config(model_dir, data, out, max_steps=6, save_every=3, resume="auto")


def test_resume_refuses_changed_reference_weights(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=0)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(24, seed=5))
    resume = _interrupted_run(model, data, tmp_path / "run")
    other = save_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")  # the --model folder's weights change
    lines: list[str] = []
    with pytest.raises(DpokitError, match=r"reference model's weights \(.*model\) changed .* --overwrite"):
        train(resume, log=lines.append)
    assert not any(line.startswith("reference log-probs") for line in lines)  # refused before the pass


def test_resume_refuses_changed_data_before_the_reference_pass(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(24, seed=5))
    resume = _interrupted_run(tiny_model_dir, data, tmp_path / "run")
    write_jsonl(data, make_pairs(24, seed=6))
    lines: list[str] = []
    with pytest.raises(DpokitError, match="training data .* differs .* use the original data, or start over"):
        train(resume, log=lines.append)
    assert not any(line.startswith("reference log-probs") for line in lines)


def _cache_rows(folder) -> list[int]:
    (path,) = folder.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("computed").nonzero().flatten().tolist()


def test_reference_pass_covers_only_the_pairs_the_run_uses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(64, seed=5))
    cache = tmp_path / "cache"
    lines: list[str] = []
    train(_config(tiny_model_dir, data, tmp_path / "a", max_steps=2, speed={"reference_cache": str(cache)}),
          log=lines.append)
    assert any("reference log-probs of 64 pairs: computed 8 " in line for line in lines), lines
    first = _cache_rows(cache)
    assert len(first) == 8
    lines.clear()  # a longer run with the same model and data extends the same file
    train(_config(tiny_model_dir, data, tmp_path / "b", max_steps=5, speed={"reference_cache": str(cache)}),
          log=lines.append)
    assert any("computed 12 " in line for line in lines), lines
    assert set(first) < set(_cache_rows(cache)) and len(_cache_rows(cache)) == 20
    lines.clear()
    train(_config(tiny_model_dir, data, tmp_path / "c", max_steps=3, speed={"reference_cache": str(cache)}),
          log=lines.append)
    assert any("reused" in line for line in lines if line.startswith("reference log-probs")), lines


def test_cache_key_holds_4bit_loading_and_the_attention_implementation(tiny_model_dir, toy_data, tmp_path,
                                                                         monkeypatch):
    from dpokit.model.reference import reference_fingerprint

    base = reference_fingerprint("w", "fp32", load_in_4bit=False, attention="sdpa")
    assert base != reference_fingerprint("w", "fp32", load_in_4bit=True, attention="sdpa")
    assert base != reference_fingerprint("w", "fp32", load_in_4bit=False, attention="eager")
    cache = tmp_path / "cache"
    real = setup.load_policy

    def reference_lines(attention: str) -> list[str]:
        def load(*args):
            model = real(*args)
            model.config._attn_implementation = attention
            return model
        monkeypatch.setattr(setup, "load_policy", load)
        lines: list[str] = []
        train(_config(tiny_model_dir, toy_data[0], tmp_path / attention, max_steps=1,
                      speed={"reference_cache": str(cache), "layout": "padded"}), log=lines.append)
        return [line for line in lines if line.startswith("reference log-probs")]

    assert "computed" in reference_lines("sdpa")[0]
    assert "computed" in reference_lines("eager")[0]  # another kernel: never the sdpa cache


def test_a_second_writer_is_refused_naming_the_holder(tiny_model_dir, toy_data, tmp_path):
    from dpokit.io import run_folder_lock

    out = tmp_path / "run"
    holder = rf"--output {out} is in use by another dpokit process \(pid {os.getpid()}\)"
    with run_folder_lock(out), pytest.raises(DpokitError, match=holder):
        train(_config(tiny_model_dir, toy_data[0], out, max_steps=1, resume="auto"), log=lambda _: None)
    train(_config(tiny_model_dir, toy_data[0], out, max_steps=1), log=lambda _: None)  # free again: it runs


def test_the_lock_dies_with_its_process(tmp_path):
    from dpokit.io import run_folder_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dpokit.io import run_folder_lock\n"
                               f"with run_folder_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DpokitError, match=f"pid {holder.pid}"), run_folder_lock(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_folder_lock(tmp_path):  # SIGKILL left no stale lock
        pass


def test_sweep_online_and_demo_lock_their_folder(tmp_path):
    from dpokit.config import JudgeConfig, OnlineConfig, SamplingConfig
    from dpokit.experiments.demo.sentiment import run_demo, settings_for
    from dpokit.experiments.online import run_online
    from dpokit.experiments.sweep import run_sweep
    from dpokit.io import run_folder_lock

    base = build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": str(tmp_path)}})
    judging = JudgeConfig(prompts="p.jsonl", judge="sentiment")
    with run_folder_lock(tmp_path):
        for call in (lambda: run_sweep(base, [0.1], ["sigmoid"], judging, SamplingConfig()),
                     lambda: run_online(base, ["x"], OnlineConfig(), judging, SamplingConfig()),
                     lambda: run_demo(settings_for("quick"), tmp_path)):
            with pytest.raises(DpokitError, match="in use by another dpokit process"):
                call()


def test_sweep_runs_share_one_reference_cache(tiny_model_dir, tmp_path, monkeypatch):
    import dpokit.experiments.frontier as frontier
    import dpokit.experiments.sweep
    from dpokit.config import JudgeConfig, SamplingConfig

    trained = []

    def fake_train(cfg, log, **kwargs):
        trained.append(cfg)
        return loop.TrainResult(output=cfg.train.output, steps=1)

    def fake_evaluate(self, run_dir, run, *args, **kwargs):
        row = {"run": run, "reward": 0.0, "reward_stderr": 0.0, "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5}
        self.reference_row = dict(row, run="reference")
        return frontier.RunEvaluation(row, {})

    monkeypatch.setattr(frontier, "train", fake_train)
    monkeypatch.setattr(frontier.FrontierRunner, "evaluate", fake_evaluate)
    monkeypatch.setattr(frontier, "plot_frontier", lambda *a, **k: None)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    base = build_config({"model": {"model": str(tiny_model_dir)}, "data": {"data": "d.jsonl"},
                         "train": {"output": str(tmp_path / "sweep")}})
    dpokit.experiments.sweep.run_sweep(base, [0.1, 0.5], ["sigmoid", "ipo"], JudgeConfig(prompts=str(prompts), judge="sentiment"),
                           SamplingConfig(), log=lambda _: None)
    assert len(trained) == 4
    assert {cfg.speed.reference_cache for cfg in trained} == {str(tmp_path / "sweep" / "reference-cache")}
