"""TR-DPO (Gorbatovski et al. 2024): the live reference moved toward the policy every τ steps,
soft (α < 1) or hard (α = 1, a copy); the reference weights travel in checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.model.reference import check_sync_compatible, reference_sync_due, sync_reference
from dpokit.scoring import uses_live_reference
from dpokit.settings_checks import warn_idle_options
from dpokit.train import loop as loop_module
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.loop import train
from helpers.toy import make_pairs, write_jsonl

STEPS = 7  # with τ = 3: syncs after steps 3 and 6, so the final reference is not the final policy


def _linear(weight: list[list[float]], bias: list[float]) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_soft_update_mixes_alpha_of_the_policy_into_the_reference():
    reference = _linear([[1.0, 2.0], [3.0, 4.0]], [0.5, -1.0]).requires_grad_(False)
    policy = _linear([[3.0, 6.0], [-1.0, 0.0]], [2.5, 1.0])
    sync_reference(reference, policy, alpha=0.25)
    # 0.75·ref + 0.25·θ, exact in binary: 0.75 + 0.75 = 1.5, 1.5 + 1.5 = 3, 2.25 − 0.25 = 2, 3 + 0 = 3
    assert torch.equal(reference.weight, torch.tensor([[1.5, 3.0], [2.0, 3.0]]))
    assert torch.equal(reference.bias, torch.tensor([1.0, -0.5]))  # 0.375 + 0.625, −0.75 + 0.25
    assert torch.equal(policy.weight, torch.tensor([[3.0, 6.0], [-1.0, 0.0]]))  # the policy is only read
    assert not reference.weight.requires_grad  # still frozen


def test_hard_update_copies_the_policy_and_a_tied_weight_once():
    def tied() -> torch.nn.Sequential:
        model = torch.nn.Sequential(torch.nn.Embedding(3, 2), torch.nn.Linear(2, 3, bias=False))
        model[1].weight = model[0].weight  # one tensor, two names
        return model

    torch.manual_seed(0)
    reference, policy = tied().requires_grad_(False), tied()
    sync_reference(reference, policy, alpha=1.0)
    assert torch.equal(reference[0].weight, policy[0].weight)
    assert reference[1].weight is reference[0].weight  # the tie survives


def test_sync_is_due_after_every_tau_th_optimizer_step_never_at_step_0():
    assert [s for s in range(0, 10) if reference_sync_due(s, 3)] == [3, 6, 9]
    assert not any(reference_sync_due(s, 0) for s in range(1, 10))  # 0: a fixed reference


def test_a_reference_of_another_shape_is_refused_in_one_line():
    with pytest.raises(DpokitError, match="--sync-reference-steps .*shape") as err:
        check_sync_compatible(torch.nn.Linear(2, 3), torch.nn.Linear(2, 2))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def sync_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sync") / "d.jsonl", make_pairs(24, seed=5))


def _config(model_dir, data, out, *, loss: dict | None = None, speed: dict | None = None, lora: dict | None = None,
            **train_options):
    section = {"output": str(out), "max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1,
               "progress": "off", **train_options}
    return build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                         "loss": {"sync_reference_steps": 3, "sync_reference_alpha": 0.5, **(loss or {})},
                         "speed": speed or {}, "lora": lora or {}, "train": section})


def _checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(folder / "model.safetensors")), load_file(str(folder / "reference.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_hard_sync_copies_the_policy_at_steps_tau_2tau_only(tiny_model_dir, sync_data, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, sync_data, out, loss={"sync_reference_steps": 2, "sync_reference_alpha": 1.0},
                  max_steps=5, save_every=1, keep_checkpoints=10)
    train(cfg, log=lambda _: None)
    saved = {int(p.name.split("-")[1]): _checkpoint(p) for p in list_checkpoints(out)}
    assert sorted(saved) == [1, 2, 3, 4, 5]
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    _assert_bitwise_equal(saved[1][1], initial)  # no sync before step τ
    for step, copied_at in ((2, 2), (3, 2), (4, 4), (5, 4)):
        _assert_bitwise_equal(saved[step][1], saved[copied_at][0])  # the policy of the last sync step
    assert not torch.equal(saved[5][1]["lm_head.weight"], saved[5][0]["lm_head.weight"])  # step 5 moved on


class _Killed(Exception):
    pass


def _run_killed_at(model_dir, data, out, step: int, monkeypatch) -> None:
    """A run with a checkpoint after every step, dying as step `step` begins (as SIGKILL would)."""
    real = loop_module.train_step

    def dying(*args, **kwargs):
        if kwargs["step"] == step:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", dying)
    with pytest.raises(_Killed):
        train(_config(model_dir, data, out, save_every=1), log=lambda _: None)
    monkeypatch.setattr(loop_module, "train_step", real)


@pytest.mark.parametrize("killed_at", [4, 5], ids=["right-after-a-sync", "between-syncs"])
def test_resumed_tr_dpo_run_is_bitwise_equal_to_an_uninterrupted_one(tiny_model_dir, sync_data, tmp_path, killed_at,
                                                                     monkeypatch):
    whole = tmp_path / "whole"
    train(_config(tiny_model_dir, sync_data, whole), log=lambda _: None)
    policy, reference = _checkpoint(list_checkpoints(whole)[-1])
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(reference["lm_head.weight"], initial["lm_head.weight"])  # it synced
    assert not torch.equal(reference["lm_head.weight"], policy["lm_head.weight"])  # and is not the policy

    out = tmp_path / "resumed"
    _run_killed_at(tiny_model_dir, sync_data, out, killed_at, monkeypatch)
    assert list_checkpoints(out)[-1].name == f"step-{killed_at - 1:07d}"
    train(_config(tiny_model_dir, sync_data, out, save_every=1, resume="auto"), log=lambda _: None)
    resumed_policy, resumed_reference = _checkpoint(list_checkpoints(out)[-1])
    _assert_bitwise_equal(resumed_policy, policy)
    _assert_bitwise_equal(resumed_reference, reference)
    _assert_bitwise_equal(load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors")))


def test_a_damaged_reference_file_is_named_on_resume(tiny_model_dir, sync_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model_dir, sync_data, out, max_steps=4, save_every=3), log=lambda _: None)
    damaged = list_checkpoints(out)[0] / "reference.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(DpokitError, match=r"reference\.safetensors is damaged") as err:
        train(_config(tiny_model_dir, sync_data, out, max_steps=4, save_every=3,
                      resume=str(list_checkpoints(out)[0])), log=lambda _: None)
    assert "\n" not in str(err.value)


def _cli(model_dir, data, out, *extra) -> list[dict]:
    args = ["train", "--model", model_dir, "--data", data, "--output", out, "--max-steps", 2, "--batch-size", 4,
            "--learning-rate", 1e-2, "--max-length", 32, "--progress", "off", "--sync-reference-alpha", 1, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpokit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_two_cli_steps_with_a_hard_sync_every_step_start_each_step_at_ln2(tiny_model_dir, sync_data, tmp_path):
    """With τ = 1 and α = 1 the reference of step 2 is the policy after step 1, so step 2 starts
    where DPO's step 1 does: policy = reference, loss ln 2, rewards 0; the evaluation after each
    step comes after that step's sync, so it too sees policy = reference. With τ = 2 the first
    sync comes after step 2, which therefore sees the initial reference (loss away from ln 2)."""
    every_step = _cli(tiny_model_dir, sync_data, tmp_path / "tau1", "--sync-reference-steps", 1,
                      "--eval-data", sync_data, "--eval-every", 1)
    every_other = _cli(tiny_model_dir, sync_data, tmp_path / "tau2", "--sync-reference-steps", 2)
    trained = [r for r in every_step if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for record in trained:
        assert math.isclose(record["loss"], math.log(2), abs_tol=1e-6), record
        assert abs(record["rewards/margins"]) < 1e-6
    evaluated = [r for r in every_step if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [0, 1, 2]
    assert all(abs(r["eval_rewards/margins"]) < 1e-6 for r in evaluated), evaluated
    assert every_other[0]["loss"] == pytest.approx(trained[0]["loss"], abs=1e-6)  # step 1: the same start
    assert abs(every_other[1]["loss"] - math.log(2)) > 1e-3  # step 2: scored against the initial reference


@pytest.mark.parametrize(
    ("over", "flag"),
    [
        ({"loss": {"sync_reference_steps": -1}}, "--sync-reference-steps"),
        ({"loss": {"sync_reference_alpha": 0.0}}, "--sync-reference-alpha"),
        ({"loss": {"sync_reference_alpha": 1.5}}, "--sync-reference-alpha"),
        ({"loss": {"sync_reference_alpha": float("nan")}}, "--sync-reference-alpha"),
        ({"loss": {"loss": "simpo"}}, "no reference"),
        ({"speed": {"reference": "precomputed"}}, "--reference precomputed"),
        ({"lora": {"lora_r": 4}}, "LoRA"),
    ],
)
def test_bad_sync_settings_fail_in_one_line(tiny_model_dir, sync_data, tmp_path, over, flag):
    with pytest.raises(DpokitError, match=flag) as err:
        _config(tiny_model_dir, sync_data, tmp_path / "x", **over)
    assert "\n" not in str(err.value)


def test_auto_reference_is_live_when_syncing_and_torchrun_is_refused(tiny_model_dir, sync_data, tmp_path):
    cfg = _config(tiny_model_dir, sync_data, tmp_path / "x")
    assert cfg.speed.reference == "auto"
    assert uses_live_reference(cfg.model, cfg.speed, 1, synced=True)
    assert not uses_live_reference(cfg.model, cfg.speed, 1, synced=False)
    with pytest.raises(DpokitError, match="--sync-reference-steps .*torchrun") as err:
        uses_live_reference(cfg.model, cfg.speed, 2, synced=True)
    assert "\n" not in str(err.value)


def test_an_alpha_without_sync_steps_is_warned_about(tiny_model_dir, sync_data, tmp_path):
    lines: list[str] = []
    warn_idle_options(_config(tiny_model_dir, sync_data, tmp_path / "x", loss={"sync_reference_steps": 0}), lines.append)
    assert lines == ["warning: --sync-reference-alpha 0.5 does nothing without --sync-reference-steps"]
    lines.clear()
    warn_idle_options(_config(tiny_model_dir, sync_data, tmp_path / "x"), lines.append)
    assert lines == []
