"""The memory probe: one training step at a candidate setting, in a child process, and its peak.

The child (`python -m dpokit.train.memory_probe SPEC RESULT`) builds what a run builds (policy,
scorer with its reference, optimizer: train/setup.py), gives the optimizer its state (a
zero-gradient step, as a run has from its second step on) and, when the setting accumulates, the
gradients a second micro-batch finds already allocated; then takes one step (`train_step`, the
run's own) on the data's longest pairs. Its peak is what the kernel recorded for it: on the CPU
its peak resident set (`wait4`'s `ru_maxrss`, the high-water mark, so a spike between two
readings counts); on CUDA the allocator's most reserved memory. A child, so that nothing the
parent holds counts, and so that a setting that does not fit costs a child, not the run.

The child skips the run's set-up work that is not the step (`build_scorer(memory_probe=True)`):
the reference pass (a precomputed reference is a table of two floats a pair; zeros stand in) and
the first-batch check (no-gradient forwards before the optimizer has state). It settles the layout
on the run's own first-epoch batches, as the run does, and reports the scoring path it probed
(`scoring_path`); the run checks its own path against it after its first-batch check
(memory_budget.check_probed_path). On the real model at 768 tokens these two were a third of a
probe's wall time (benchmarks/RESULTS.md section 13b).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from dpokit.config import RunConfig
from dpokit.data import TokenizedPair
from dpokit.errors import DpokitError, first_line
from dpokit.model.recompute import CachedOutputMutated
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


def run_probe(cfg: RunConfig, data: RunData, setting: Setting, requested: int,
              server: ProbeServer | None = None) -> Probe:
    """Probe `setting` for a run of `cfg` (as the user gave it) on `data` whose per-step batch is
    `requested`: a child process stepping on `setting.micro_batch` of the longest training pairs,
    forked by `server` (a new one for this probe when None)."""
    if server is None:
        with ProbeServer() as own:
            return run_probe(cfg, data, setting, requested, own)
    probe_cfg = planned_config(cfg, setting, requested)
    probe_cfg = replace(probe_cfg, scale=replace(probe_cfg.scale, memory_budget=None))
    with tempfile.TemporaryDirectory(prefix="dpokit-probe-") as scratch:
        spec, result, log = (Path(scratch) / name for name in ("spec.pkl", "result.json", "child.log"))
        spec.write_bytes(pickle.dumps({"config": probe_cfg, "data": replace(data, eval_pairs=[], counts={}),
                                       "pairs": longest_pairs(data.train_pairs, setting.micro_batch),
                                       "accumulating": requested > setting.micro_batch}))
        status, usage = server.run(spec, result, log)
        found = json.loads(result.read_text()) if result.is_file() else {}
        if "error" in found or ("selective_refused" in found and cfg.scale.selective_recompute):
            raise DpokitError(found.get("error") or found["selective_refused"])  # the run itself would stop here
        if "selective_refused" in found:  # a lever the plan pulled, not the user: a level that fits nothing
            return Probe(setting, None, 0.0)
        if status != 0 and not found:
            said = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
            tail = (said or ["no output"])[-1][:200]
            if status > 0:  # an exit, not a kill: a failure to report rather than an out-of-memory
                raise DpokitError(f"--memory-budget: the probe at micro-batch {setting.micro_batch} failed: {tail}")
    # Killed (the kernel's out-of-memory killer) or out of CUDA memory: no reading, over the budget.
    peak = None if status != 0 or "out_of_memory" in found else found.get("cuda_peak", usage)
    return Probe(setting, int(peak) if peak else None, float(found.get("seconds", 0.0)), found.get("scoring"))


class ProbeServer:
    """A process that has imported what a probe needs and forks one child per probe.

    Each probe is still a process of its own, whose peak RSS the kernel records from its start
    (a forked child's resident set starts as its parent's: the imported libraries, as in a fresh
    process), but it starts in a second, not after the seconds of importing torch, transformers
    and torch._dynamo again: a plan makes up to five probes. The server itself runs no torch
    work, so the children fork from a process with no thread pool and no device initialised. A
    child killed by the kernel's out-of-memory killer leaves the server serving the next probe.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None  # started at the first probe

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, spec: Path, result: Path, log: Path) -> tuple[int, int | None]:
        """One probe: the child's exit status (negative: the signal that killed it) and peak RSS, bytes."""
        if not hasattr(os, "fork"):
            raise DpokitError("--memory-budget probes in forked processes, which this platform lacks (Linux and "
                              "macOS have them); set --batch-size and the memory options yourself")
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                   "PYTHONWARNINGS": "ignore"}
            self.process = subprocess.Popen([sys.executable, "-m", "dpokit.train.memory_probe", "--serve"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.process.stdin.write(json.dumps([str(spec), str(result), str(log)]) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:  # the server itself died: as a killed probe when a signal did it
            status = self.process.wait()
            return (status if status < 0 else 1), None
        status, peak = json.loads(answer)
        return status, peak

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()  # the server's loop ends at end of input
            self.process.wait()
        self.process = None


def _serve() -> None:
    """The server's loop: a [spec, result, log] line in, a [status, peak RSS bytes] line out."""
    import torch._dynamo  # noqa: F401 - the optimizer's first step imports it: once here, not per probe

    for line in sys.stdin:
        spec, result, log = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the probe, which never returns to this loop
            os._exit(_forked_probe(Path(spec), Path(result), Path(log)))
        print(json.dumps(_wait(pid)), flush=True)


def _forked_probe(spec: Path, result: Path, log: Path) -> int:
    """In the forked child: its output to `log`, the probe, its exit code."""
    with log.open("w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    try:
        _child(spec, result)
        return 0
    except BaseException:  # noqa: BLE001 - reported in the log, whose last line the parent quotes
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _wait(pid: int) -> tuple[int, int | None]:
    """The child's exit status (negative: the signal that killed it) and its peak RSS in bytes;
    killed past CHILD_TIMEOUT_S."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        found, status, usage = os.wait4(pid, os.WNOHANG)
        if found:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * scale if usage.ru_maxrss else None


def _child(spec_path: Path, result_path: Path) -> None:
    spec = pickle.loads(spec_path.read_bytes())
    try:
        found = probe_step(spec["config"], spec["data"], spec["pairs"], accumulating=spec["accumulating"])
    except CachedOutputMutated as exc:  # the model cannot take selective recompute (model/recompute.py)
        found = {"selective_refused": first_line(exc)}
    except DpokitError as exc:
        found = {"error": first_line(exc)}
    except torch.OutOfMemoryError:  # CUDA: over the device's memory, so over any budget
        found = {"out_of_memory": True}
    result_path.write_text(json.dumps(found))


def probe_step(cfg: RunConfig, data: RunData, pairs: list[TokenizedPair], *, accumulating: bool) -> dict:
    """In the child: one optimizer step of the run `cfg` on `data`, taken on `pairs` (one
    micro-batch of its training pairs), timed."""
    ctx, device = init_distributed(cfg.model.device)
    quiet = lambda _line: None  # noqa: E731 - the parent reports
    tokenizer = load_run_tokenizer(model=cfg.model, data=cfg.data, log=quiet)
    policy, _ = load_run_policy(model=cfg.model, lora=cfg.lora, loss=cfg.loss, device=device, ctx=ctx,
                                scale=cfg.scale)
    with tempfile.TemporaryDirectory(prefix="dpokit-probe-run-") as scratch:
        scorer = build_run_scorer(policy, tokenizer, data, cfg, reference_weights="memory-probe", device=device,
                                  ctx=ctx, log=quiet, output=Path(scratch), reference_cache=None, memory_probe=True)
        parts = build_training_parts(scorer.policy, train=cfg.train, dtype=cfg.model.dtype, total_steps=1,
                                     device=device, ctx=ctx)
        _steady_state(parts, accumulating)
        started = time.perf_counter()
        train_step(parts, scorer, [pairs], pairs[0], pairs_in_step=len(pairs), train=cfg.train, ctx=ctx, step=1,
                   output=Path(scratch), log=quiet)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    found = {"device": device.type, "seconds": seconds, "scoring": scoring_path(scorer),
             "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if device.type == "cuda":
        found["cuda_peak"] = torch.cuda.max_memory_reserved(device)
    return found


def scoring_path(scorer) -> dict:
    """What a step's memory depends on in the scorer: its batch layouts and LM head (None: each
    model's own choice). The first-batch check may move a run to padded + plain after probing."""
    return {"layouts": list(scorer.layouts), "chunked_head": scorer.chunked_head}


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
    _serve()
