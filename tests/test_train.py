"""Training end to end in-process on a tiny Llama: learning, reload, accumulation invariance."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.config import build_config
from dpokit.train.loop import train
from helpers.toy import make_pairs, write_jsonl


def _config(model_dir, data, out, **train_opts):
    train_section = {"output": str(out), "learning_rate": 1e-3, "progress": "off", **train_opts}
    return build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                         "train": train_section})


def test_learns_the_toy_preference_and_reloads(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    cfg = _config(tiny_model_dir, train_file, tmp_path / "run", batch_size=8, max_steps=24, warmup_steps=2)
    cfg.data.eval_data = str(eval_file)
    cfg.train.eval_every = 12
    result = train(cfg, log=lambda _: None)
    assert result.final_eval["eval_rewards/accuracies"] >= 0.95
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in history if "loss" in r]
    assert steps[-1]["rewards/accuracies"] >= 0.95
    assert steps[-1]["loss"] < steps[0]["loss"] < 0.7
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                 "grad_norm", "learning_rate", "epoch", "throughput/pairs_per_s", "throughput/tokens_per_s"):
        assert name in steps[-1], name
    assert history[0]["step"] == 0 and history[0]["eval_rewards/margins"] == 0.0  # policy == reference

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    with torch.no_grad():
        assert not torch.allclose(reloaded(ids).logits, base(ids).logits)  # it trained
    cfg2 = _config(tiny_model_dir, train_file, tmp_path / "run2", batch_size=8, max_steps=24, warmup_steps=2)
    cfg2.data.eval_data, cfg2.train.eval_every = str(eval_file), 12
    # Same seed, same data: the saved weights reproduce run to run.
    train(cfg2, log=lambda _: None)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run2")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, again(ids).logits)
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "dpokit_config.yaml").is_file()


def _sgd_run(model_dir, data, out, batch_size, accumulation, steps, monkeypatch, memory_budget=None):
    """Train with plain SGD and record each step's accumulated gradients before clip and step.

    SGD, not AdamW: Adam divides by sqrt(v), so a coordinate whose gradient is float noise in
    one run and other float noise in the other moves by up to the learning rate either way.
    With SGD a float difference in a gradient stays that small in the weights."""
    from dpokit.train import setup, step
    from dpokit.train.wrap import clip_grad_norm as clip

    grads: list[dict[str, torch.Tensor]] = []

    def recording_clip(params, max_norm):
        grads.append({str(i): p.grad.detach().clone() for i, p in enumerate(params)})
        return clip(params, max_norm)

    monkeypatch.setattr(step, "clip_grad_norm", recording_clip)
    monkeypatch.setattr(setup, "build_optimizer", lambda model, t: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate))
    cfg = _config(model_dir, data, out, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                  max_steps=steps, lr_scheduler="constant")
    cfg.scale.memory_budget = memory_budget
    result = train(cfg, log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return [r["loss"] for r in result.history], grads, weights


@pytest.mark.parametrize(("pairs", "big", "small"), [(64, (8, 1), (4, 2)), (10, (6, 1), (3, 2))])
def test_accumulation_gives_the_same_update(tiny_model_dir, tmp_path, monkeypatch, pairs, big, small):
    # With 10 pairs and 6 per step, the last step holds 4 pairs split 3 + 1: a per-micro-batch mean
    # would weigh that single pair three times too much, and this test would fail.
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(pairs, seed=7))
    steps = 3 if pairs > 10 else 2
    loss_a, grads_a, weights_a = _sgd_run(tiny_model_dir, data, tmp_path / "a", *big, steps, monkeypatch)
    loss_b, grads_b, weights_b = _sgd_run(tiny_model_dir, data, tmp_path / "b", *small, steps, monkeypatch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.allclose(base[k], weights_a[k]) for k in base)  # the weights did move
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert len(grads_a) == len(grads_b) == steps
    for step, (a, b) in enumerate(zip(grads_a, grads_b, strict=True)):
        # fp32 sums of the same terms in another order: relative error ~1e-6 of the largest term.
        scale = max(g.abs().max().item() for g in a.values())
        for name, grad in a.items():
            torch.testing.assert_close(grad, b[name], atol=1e-5 * scale, rtol=1e-4, msg=f"step {step + 1} {name}")
    for name, tensor in weights_a.items():  # SGD: lr x (float noise in the gradients), far below 1e-5
        assert torch.allclose(tensor, weights_b[name], atol=1e-5, rtol=0), name


def test_a_memory_plan_gives_the_update_of_the_run_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    """--memory-budget splits batch 8 into micro-batches of 4 (accumulation 2), with gradient
    checkpointing: the same update as batch 8 asked for directly, to the tolerance above."""
    from dpokit.train import memory_budget
    from dpokit.train.memory_plan import Probe

    def probe(cfg, data, setting, requested, server):  # 100 MB + 100 MB a pair, 60 with the levers (10% slower)
        per_pair = 60 if setting.levers else 100
        return Probe(setting, (100 + per_pair * setting.micro_batch) * 10**6,
                     (1.0 + setting.micro_batch) * (1.1 if setting.levers else 1.0))

    monkeypatch.setattr(memory_budget, "run_probe", probe)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(64, seed=7))
    loss_a, grads_a, weights_a = _sgd_run(tiny_model_dir, data, tmp_path / "a", 8, 1, 3, monkeypatch)
    loss_b, grads_b, weights_b = _sgd_run(tiny_model_dir, data, tmp_path / "b", 8, 1, 3, monkeypatch,
                                          memory_budget="500MB")
    plan = json.loads((tmp_path / "b" / "memory_plan.json").read_text())
    assert (plan["micro_batch"], plan["levers"][:1]) == (4, ["gradient_checkpointing"])  # 340 MB of 450 allowed, 11 s a step
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for step, (a, b) in enumerate(zip(grads_a, grads_b, strict=True)):
        scale = max(g.abs().max().item() for g in a.values())  # as in the accumulation test above
        for name, grad in a.items():
            torch.testing.assert_close(grad, b[name], atol=1e-5 * scale, rtol=1e-4, msg=f"step {step + 1} {name}")
    for name, tensor in weights_a.items():
        assert torch.allclose(tensor, weights_b[name], atol=1e-5, rtol=0), name


def test_published_files_get_the_usual_permissions(tmp_path):
    import os

    from dpokit.io import atomic_write_text, make_staging_dir

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        staging = make_staging_dir(tmp_path, ".s-")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert staging.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_a_training_process_imports_no_evaluation_plotting_or_cli(tiny_model_dir, toy_data, tmp_path):
    """Catches: training that pulls in matplotlib, evaluation or the CLI, at import or at run time
    (a lazy import, or one through another module such as trackers). A fresh interpreter trains
    two steps, reporting to TensorBoard, then lists what it imported."""
    import subprocess
    import sys

    config = {"model": {"model": str(tiny_model_dir)}, "data": {"data": str(toy_data[0]), "max_length": 32},
              "train": {"output": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "progress": "off",
                        "report_to": "tensorboard"}}
    script = ("import json, sys\n"
              "from dpokit.config import build_config\n"
              "from dpokit.train.loop import train\n"
              "train(build_config(json.loads(sys.argv[1])), log=lambda _: None)\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = json.loads(proc.stdout.splitlines()[-1])
    assert "dpokit.train.loop" in modules and (tmp_path / "run" / "model.safetensors").is_file()
    above = ("dpokit.eval", "dpokit.experiments", "dpokit.cli", "matplotlib")
    assert [m for m in modules if m in above or m.startswith(tuple(f"{a}." for a in above))] == []


def test_train_writes_no_report_and_the_cli_writes_it_after(tiny_model_dir, toy_data, tmp_path, capsys):
    from dpokit.cli import main

    train(_config(tiny_model_dir, toy_data[0], tmp_path / "lib", max_steps=2), log=lambda _: None)
    assert (tmp_path / "lib" / "model.safetensors").is_file()
    assert not (tmp_path / "lib" / "report.md").exists() and not (tmp_path / "lib" / "training_curves.png").exists()
    out = tmp_path / "cli"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
                 "--max-steps", "2", "--max-length", "32", "--progress", "off"]) == 0
    assert "Final training figures (step 2)" in (out / "report.md").read_text()
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("saved the trained policy") and lines[-1] == f"report: {out / 'report.md'}"


def test_the_step_body_reads_the_device_once_per_step(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    # Host reads (bool/item/tolist/float/int of a tensor) made by the training package's own code,
    # in runs of 2 and 4 steps that log and save only at the end: the difference is per step.
    import sys
    from pathlib import Path

    import dpokit.train

    package = str(Path(dpokit.train.__file__).parent)
    reads: list[str] = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                reads.append(f"{Path(caller).name}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        counting(name)
    per_run = []
    for steps in (2, 4):
        reads.clear()
        train(_config(tiny_model_dir, toy_data[0], tmp_path / str(steps), max_steps=steps, batch_size=4,
                      log_every=100), log=lambda _: None)
        per_run.append(list(reads))
    extra = sorted(per_run[1])
    for read in per_run[0]:
        extra.remove(read)
    assert len(extra) == 2 and len(set(extra)) == 1 and extra[0].startswith("step.py:"), extra  # one per step
