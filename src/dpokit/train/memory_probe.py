"""The memory probe: one training step at a candidate setting, in a child process, and its peak.

The child (`python -m dpokit.train.memory_probe SPEC RESULT`) builds what a run builds (policy,
scorer with its reference, optimizer: train/setup.py), gives the optimizer its state (a
zero-gradient step, as a run has from its second step on) and, when the setting accumulates, the
gradients a second micro-batch finds already allocated; then takes one step (`train_step`, the
run's own) on the data's longest pairs. Its peak is what the kernel recorded for it: on the CPU
its peak resident set (`wait4`'s `ru_maxrss`, the high-water mark, so a spike between two
readings counts); on CUDA the allocator's most reserved memory. A child, so that nothing the
parent holds counts, and so that a setting that does not fit costs a child, not the run.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dpokit.config import RunConfig
from dpokit.data import TokenizedPair
from dpokit.errors import DpokitError, first_line
from dpokit.model.reference import data_fingerprint
from dpokit.train.distributed import init_distributed
from dpokit.train.memory_plan import Probe, Setting, planned_config
from dpokit.train.setup import (
    RunData,
    build_run_scorer,
    build_training_parts,
    load_run_policy,
    load_run_tokenizer,
)
from dpokit.train.step import train_step

CHILD_TIMEOUT_S = 1800  # one step of the run, a model load: a child past this is stuck


def longest_pairs(pairs: list[TokenizedPair], count: int) -> list[TokenizedPair]:
    """The `count` pairs with the most tokens (repeated when the data has fewer)."""
    ranked = sorted(pairs, key=lambda p: p.num_tokens, reverse=True)
    return [ranked[i % len(ranked)] for i in range(count)]


def run_probe(cfg: RunConfig, pairs: list[TokenizedPair], setting: Setting, requested: int) -> Probe:
    """Probe `setting` for a run of `cfg` (as the user gave it) whose per-step batch is `requested`:
    a child process on `setting.micro_batch` of the longest `pairs`."""
    probe_cfg = planned_config(cfg, setting, requested)
    probe_cfg = replace(probe_cfg, scale=replace(probe_cfg.scale, memory_budget=None))
    with tempfile.TemporaryDirectory(prefix="dpokit-probe-") as scratch:
        spec, result, log = (Path(scratch) / name for name in ("spec.pkl", "result.json", "child.log"))
        spec.write_bytes(pickle.dumps({"config": probe_cfg, "pairs": longest_pairs(pairs, setting.micro_batch),
                                       "accumulating": requested > setting.micro_batch}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONWARNINGS": "ignore"}
        with log.open("w") as out:
            child = subprocess.Popen([sys.executable, "-m", "dpokit.train.memory_probe", str(spec), str(result)],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
        status, usage = _wait(child)
        found = json.loads(result.read_text()) if result.is_file() else {}
        if "error" in found:  # the run itself would stop here: say why, as it would
            raise DpokitError(found["error"])
        if status != 0 and not found:
            tail = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1][:200]
            if status > 0:  # an exit, not a kill: a failure to report rather than an out-of-memory
                raise DpokitError(f"--memory-budget: the probe at micro-batch {setting.micro_batch} failed: {tail}")
    # Killed (the kernel's out-of-memory killer) or out of CUDA memory: no reading, over the budget.
    peak = None if status != 0 or "out_of_memory" in found else found.get("cuda_peak", usage)
    return Probe(setting, int(peak) if peak else None, float(found.get("seconds", 0.0)))


def _wait(child: subprocess.Popen) -> tuple[int, int | None]:
    """The child's exit status (negative: the signal that killed it) and its peak RSS in bytes."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            child.kill()
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return child.returncode, usage.ru_maxrss * scale if usage.ru_maxrss else None


def _child(spec_path: Path, result_path: Path) -> None:
    spec = pickle.loads(spec_path.read_bytes())
    try:
        found = probe_step(spec["config"], spec["pairs"], accumulating=spec["accumulating"])
    except DpokitError as exc:
        found = {"error": first_line(exc)}
    except torch.OutOfMemoryError:  # CUDA: over the device's memory, so over any budget
        found = {"out_of_memory": True}
    result_path.write_text(json.dumps(found))


def probe_step(cfg: RunConfig, pairs: list[TokenizedPair], *, accumulating: bool) -> dict:
    """In the child: one optimizer step of the run `cfg` on `pairs` (one micro-batch), timed."""
    ctx, device = init_distributed(cfg.model.device)
    quiet = lambda _line: None  # noqa: E731 - the parent reports
    tokenizer = load_run_tokenizer(model=cfg.model, data=cfg.data, log=quiet)
    policy, _ = load_run_policy(model=cfg.model, lora=cfg.lora, loss=cfg.loss, device=device, ctx=ctx,
                                gradient_checkpointing=cfg.scale.gradient_checkpointing)
    data = RunData(list(pairs), [], data_fingerprint(pairs), len(pairs), 1, 1)
    with tempfile.TemporaryDirectory(prefix="dpokit-probe-run-") as scratch:
        scorer = build_run_scorer(policy, tokenizer, data, cfg, reference_weights="memory-probe", device=device,
                                  ctx=ctx, log=quiet, output=Path(scratch), reference_cache=None)
        parts = build_training_parts(scorer.policy, train=cfg.train, dtype=cfg.model.dtype, total_steps=1,
                                     device=device, ctx=ctx)
        _steady_state(parts, accumulating)
        started = time.perf_counter()
        train_step(parts, scorer, [pairs], pairs[0], pairs_in_step=len(pairs), train=cfg.train, ctx=ctx, step=1,
                   output=Path(scratch), log=quiet)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    found = {"device": device.type, "seconds": seconds,
             "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if device.type == "cuda":
        found["cuda_peak"] = torch.cuda.max_memory_reserved(device)
    return found


def _steady_state(parts, accumulating: bool) -> None:
    """The memory a run's later steps start with: the optimizer's state (made by a step on zero
    gradients, which moves no weight but for decoupled weight decay's lr x wd shrink, harmless
    in a probe) and, when accumulating, the gradients the first micro-batch left."""
    for p in parts.params:
        p.grad = torch.zeros_like(p)
    parts.optimizer.step()
    if not accumulating:
        parts.optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
