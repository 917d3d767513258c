"""Issue 36.9: a setting's note ("beyond the model's context", the warm-up warning...) is said once per
command, not once per sweep run or online round."""

from __future__ import annotations

from dpokit.config import JudgeConfig, OnlineConfig, SamplingConfig, build_config
from dpokit.experiments.online import run_online
from dpokit.experiments.sweep import run_sweep
from helpers.fast_frontier import fast_frontier
from helpers.toy import make_pairs, write_jsonl


def _base(model, data, out):
    return build_config({"model": {"model": str(model)}, "data": {"data": str(data), "max_length": 4096},
                         "train": {"output": str(out), "max_steps": 1, "batch_size": 4, "warmup_steps": 4,
                                   "progress": "off"}})


def test_a_sweep_says_the_context_cap_once(tiny_model_dir, tmp_path, monkeypatch):
    fast_frontier(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4, seed=1))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    lines: list[str] = []
    run_sweep(_base(tiny_model_dir, data, tmp_path / "sweep"), [0.1, 0.5, 1.0], ["sigmoid"],
              JudgeConfig(prompts=str(prompts), judge="sentiment"), SamplingConfig(), log=lines.append)
    assert len([line for line in lines if line.startswith("training ")]) == 3  # three runs trained
    assert len([line for line in lines if "beyond the model's context" in line]) == 1
    assert len([line for line in lines if "warm-up of 4 steps" in line]) == 1


def test_online_rounds_say_the_context_cap_once(tiny_model_dir, tmp_path, monkeypatch):
    fast_frontier(monkeypatch)
    prompts = [r["prompt"] for r in make_pairs(4, seed=5)]
    lines: list[str] = []
    run_online(_base(tiny_model_dir, "unused.jsonl", tmp_path / "online"), prompts,
               OnlineConfig(rounds=3, samples_per_prompt=3), JudgeConfig(judge="sentiment"),
               SamplingConfig(num_samples=1, max_new_tokens=4), log=lines.append)
    assert len([line for line in lines if line.startswith("training ")]) == 3
    assert len([line for line in lines if "beyond the model's context" in line]) == 1
