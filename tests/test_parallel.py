"""torchrun on 2 CPU processes (gloo): DDP and FSDP2 equal one process with the same global batch,
and a run stopped on one rank resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.train.checkpoint import list_checkpoints
from dpokit.train.distributed import Distributed
from dpokit.train.loop import train
from dpokit.train.shards import compute_sharded, rank_steps
from helpers.toy import make_pairs, write_jsonl

STEPS = 8
# 21 pairs, global batch 8: steps of 8, 8, 5 pairs per epoch. In the 5-pair step of a 2-process
# run with batch 2 x accumulation 2, rank 0 gets 3 pairs (2 + 1) and rank 1 gets 2 (2 + a
# stand-in at weight 0): the uneven end of an epoch is part of every comparison below.
PAIRS = 21


@pytest.mark.parametrize(("n", "batch", "accumulation", "world"), [(21, 2, 2, 2), (5, 1, 1, 4), (40, 3, 2, 3)])
def test_rank_steps_split_each_step_disjointly_with_equal_micro_batch_counts(n, batch, accumulation, world):
    order = list(range(100, 100 + n))
    per_rank = [list(rank_steps(order, batch, accumulation, Distributed(rank=r, world_size=world)))
                for r in range(world)]
    global_step = batch * accumulation * world
    assert len({len(steps) for steps in per_rank}) == 1
    for s, start in enumerate(range(0, n, global_step)):
        expected = order[start : start + global_step]
        shares = [per_rank[r][s] for r in range(world)]
        assert all(total == len(expected) for total, _ in shares)  # every rank knows the global count
        assert len({len(mbs) for _, mbs in shares}) == 1  # same number of forward/backward passes
        taken = [i for _, mbs in shares for mb in mbs for i in mb]
        assert sorted(taken) == sorted(expected)  # disjoint and complete
        assert all(len(mb) <= batch for _, mbs in shares for mb in mbs)
    single = list(rank_steps(order, batch, accumulation, Distributed()))
    assert [mbs for _, mbs in single][0] == [order[i : i + batch] for i in range(0, batch * accumulation, batch)]


def test_compute_sharded_in_a_world_of_one_scores_each_item_once():
    seen = []

    def score(indices):
        seen.extend(indices)
        return torch.tensor(indices, dtype=torch.float32)[:, None] * 2

    assert torch.equal(compute_sharded(5, 2, score, Distributed()), torch.arange(5.0)[:, None] * 2)
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_compute_sharded_on_two_ranks_gathers_every_row_in_order():
    # The distributed part of the reference cache: each rank scores only its shard, all get all rows.
    helper = Path(__file__).parent / "helpers" / "sharded_scoring.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(helper), "1", "5", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for rank in (0, 1):
        for count in (1, 5, 8):
            assert f"rank {rank} count {count} ok" in proc.stdout


def test_fsdp_without_torchrun_is_one_line(tiny_model_dir, toy_data, tmp_path):
    cfg = build_config({"model": {"model": str(tiny_model_dir)}, "data": {"data": str(toy_data[0])},
                        "train": {"output": str(tmp_path / "o"), "max_steps": 1}, "scale": {"parallel": "fsdp"}})
    with pytest.raises(DpokitError, match="--parallel fsdp needs a torchrun launch"):
        train(cfg, log=lambda _: None)


# --- real torchrun launches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("par") / "d.jsonl", make_pairs(PAIRS, seed=5))


def _args(model, data, out, batch, accumulation, *extra):
    return ["train", "--model", model, "--data", data, "--output", out, "--max-steps", STEPS,
            "--batch-size", batch, "--gradient-accumulation-steps", accumulation, "--learning-rate", 1e-3,
            "--lr-scheduler", "constant", "--max-length", 32, "--progress", "off", *extra]


def _torchrun(args, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel test runs never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dpokit", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out)]


def _records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_same_metrics(a: Path, b: Path) -> None:
    """Every logged metric per step, the gradient norm included: Adam would hide a gradient off by
    the world-size factor from the weights, but not from the norm."""
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb) == STEPS
    for x, y in zip(ra, rb, strict=True):
        for name in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            assert x[name] == pytest.approx(y[name], abs=1e-5, rel=1e-5), (x["step"], name)


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max())


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = build_config({"model": {"model": str(tiny_model_dir)}, "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(out), "max_steps": STEPS, "batch_size": 8, "learning_rate": 1e-3,
                                  "lr_scheduler": "constant", "progress": "off"}})
    train(cfg, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(_args(tiny_model_dir, data, out, 2, 2, "--save-every", 1, "--keep-checkpoints", 20))
    assert "global batch 8 = 2 x 2 accumulation x 2 processes (ddp)" in proc.stdout
    assert proc.stdout.count("global batch") == 1  # only rank 0 speaks
    return out


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(one_process, ddp_run, tiny_model_dir, same_training):
    _assert_same_metrics(ddp_run, one_process)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    weights = load_file(str(ddp_run / "model.safetensors"))
    assert any(not torch.allclose(base[k], weights[k]) for k in base)  # it trained
    same_training(weights, load_file(str(one_process / "model.safetensors")))


@pytest.mark.slow
def test_ddp_with_selective_recompute_equals_one_process(one_process, tiny_model_dir, data, tmp_path, same_training):
    # DDP's gradient hooks fire during a backward that recomputes each layer's elementwise work.
    out = tmp_path / "ddp-selective"
    _torchrun(_args(tiny_model_dir, data, out, 2, 2, "--selective-recompute"))
    _assert_same_metrics(out, one_process)
    same_training(load_file(str(out / "model.safetensors")), load_file(str(one_process / "model.safetensors")))


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_and_resume_under_another_split(one_process, tiny_model_dir, data,
                                                                              tmp_path, same_training):
    # FSDP2 (fully_shard) runs on CPU with gloo in this PyTorch, so it is tested here, not only on GPUs.
    out = tmp_path / "fsdp"
    proc = _torchrun(_args(tiny_model_dir, data, out, 4, 1, "--parallel", "fsdp", "--save-every", 4))
    assert "x 2 processes (fsdp)" in proc.stdout
    _assert_same_metrics(out, one_process)
    final = load_file(str(out / "model.safetensors"))
    same_training(final, load_file(str(one_process / "model.safetensors")))
    # Its checkpoints hold the full (gathered) weights, readable without FSDP.
    step4, step8 = list_checkpoints(out)
    _assert_close(load_file(str(step8 / "model.safetensors")), final, atol=0)

    # Resume from step 4 under FSDP2 with the global batch split as 2 x 2 accumulation x 2 ...
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / step8.name)
    (again / "model.safetensors").unlink()
    resumed = _torchrun(_args(tiny_model_dir, data, again, 2, 2, "--parallel", "fsdp", "--resume", "auto"))
    assert "resuming from" in resumed.stdout and "at step 4/8" in resumed.stdout
    same_training(load_file(str(again / "model.safetensors")), final)
    # ... and in one process (8 x 1): the checkpoint does not depend on the strategy.
    single = tmp_path / "single"
    shutil.copytree(out, single)
    shutil.rmtree(single / "checkpoints" / step8.name)
    cfg = build_config({"model": {"model": str(tiny_model_dir)}, "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(single), "max_steps": STEPS, "batch_size": 8, "learning_rate": 1e-3,
                                  "lr_scheduler": "constant", "progress": "off", "resume": "auto"}})
    train(cfg, log=lambda _: None)
    same_training(load_file(str(single / "model.safetensors")), final)
    # A different global batch is refused, naming it.
    cfg.train.batch_size, cfg.train.overwrite = 4, False
    with pytest.raises(DpokitError, match="global batch .* was 8, now 4"):
        train(cfg, log=lambda _: None)


def _worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "dpokit" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} appeared")


@pytest.mark.slow
def test_ddp_stop_on_one_rank_then_resume_equals_uninterrupted(ddp_run, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, data, out, 2, 2, "--save-every", 1)
    proc = _torchrun(args, wait=False)
    rank1 = _worker(proc, 1)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    # Only rank 1 is told to stop: the ranks must agree on it, or rank 0 would wait forever.
    rank1.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0
    assert "SIGTERM received: stopped after step" in output
    stopped_at = int(list_checkpoints(out)[-1].name.split("-")[1])
    assert 1 <= stopped_at < STEPS and not (out / "model.safetensors").exists()

    resumed = _torchrun([*args, "--resume", "auto"])
    assert "resuming from" in resumed.stdout
    _assert_close(load_file(str(out / "model.safetensors")), load_file(str(ddp_run / "model.safetensors")), atol=0)
    assert _losses(out) == _losses(ddp_run)  # one run's metrics, step by step
