"""`--memory-budget` in a run's setup: the budget in bytes, the plan (probed, or the run folder's
on resume), the config it gives, the one-line refusal when nothing fits."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dpokit.config import RunConfig
from dpokit.config.parsers import parse_memory_budget
from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.model.host_memory import threshold_for
from dpokit.model.load import resolve_device
from dpokit.train.memory_plan import (
    HEAP_MARGIN,
    LEVER_WORDS,
    MARGIN,
    MemoryPlan,
    NoPlanFits,
    Probe,
    Setting,
    choose_setting,
    gib,
    offered_levers,
    planned_config,
)
from dpokit.train.memory_probe import ProbeServer, run_probe, scoring_path
from dpokit.train.setup import RunData, load_run_data, load_run_tokenizer

CPU_SHARE = 0.8  # auto on the CPU: this share of MemAvailable (the rest: the OS, the page cache, other work)


def budget_bytes(text: str, device: torch.device) -> int:
    """`--memory-budget` in bytes; auto: CUDA's free memory on `device`, or CPU_SHARE of MemAvailable."""
    value = parse_memory_budget(text)
    if value != "auto":
        return int(value)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        raise DpokitError("--memory-budget auto needs /proc/meminfo on the CPU; give a size such as 8GiB") from None
    return int(available * CPU_SHARE)


def plan_run_memory(cfg: RunConfig, data: RunData, *, device: torch.device, world_size: int,
                    resume_from: Path | None, where: Path, log: Log,
                    probe: Callable[[Setting], Probe] | None = None) -> tuple[RunConfig, MemoryPlan | None]:
    """The config the run follows under --memory-budget (as given without it), and the plan. A new
    plan is probed and written to `where`; a resumed run follows the plan in its folder, probing nothing."""
    if cfg.scale.memory_budget is None:
        return cfg, None
    if world_size > 1:
        raise DpokitError("--memory-budget plans a single process; under torchrun set --batch-size and the "
                          "memory options yourself")
    plan = MemoryPlan.read(cfg.train.output) if resume_from is not None else None
    if plan is None:
        plan = make_plan(cfg, data, device=device, probe=probe)
        plan.write(where)
    log(plan.line(data.global_batch))
    return planned_config(cfg, Setting(plan.micro_batch, tuple(plan.levers)), plan.requested), plan


def check_probed_path(plan: MemoryPlan | None, scorer) -> None:
    """After the run's first-batch check: the run scores as the plan's probe did, or it stops. The
    probe skips that check (memory_probe.py), so a fallback to padded rows and the plain LM head
    (more memory: full logits) is seen here, before any step, not as an out-of-memory an hour in."""
    if plan is None or plan.scoring is None or scoring_path(scorer) == plan.scoring:
        return
    raise DpokitError(f"--memory-budget: the plan was probed with layout {'/'.join(plan.scoring['layouts'])}, and the "
                      f"first-batch check moved this run to {'/'.join(scorer.layouts)} with the "
                      f"{'chunked' if scorer.chunked_head else 'plain'} LM head, whose memory was not probed; "
                      "run again with --layout padded --lm-head plain so that the plan probes them")


def plan_line(cfg: RunConfig, log: Log) -> str:
    """The plan `dpokit train` would follow for `cfg`, probed, as its log line (`dpokit data inspect`)."""
    tokenizer = load_run_tokenizer(model=cfg.model, data=cfg.data, log=log)
    data = load_run_data(tokenizer, data=cfg.data, train=cfg.train, world_size=1, log=log)
    return make_plan(cfg, data, device=resolve_device(cfg.model.device)).line(data.global_batch)


def make_plan(cfg: RunConfig, data: RunData, *, device: torch.device,
              probe: Callable[[Setting], Probe] | None = None) -> MemoryPlan:
    """Probe and choose; refuse in one line (DpokitError) when no setting fits the budget."""
    budget = budget_bytes(cfg.scale.memory_budget, device)
    # pairs per optimizer step in one process: the plan keeps this, trading micro-batch for accumulation
    requested = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    longest = max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in data.train_pairs),
                  default=0)
    levers = offered_levers(cfg, device.type, malloc_auto_fixes=threshold_for(None, longest, device.type) > 0)
    fixed = cfg.scale.malloc_mmap_threshold not in ("auto", "0") or threshold_for(None, longest, device.type) > 0
    margin = partial(margin_for, device_type=device.type, heap_fixed=fixed)
    started = time.perf_counter()
    with ProbeServer() as server:
        try:
            setting, probes = choose_setting(
                requested, levers, budget, probe or (lambda setting: run_probe(cfg, data, setting, requested, server)),
                margin=margin)
        except NoPlanFits as refused:
            raise DpokitError(refusal(cfg, refused, budget, longest, margin(refused.smallest.setting))) from None
    chosen = next(p for p in probes if p.setting == setting)
    return MemoryPlan(budget=budget, budget_text=str(cfg.scale.memory_budget), requested=requested,
                      micro_batch=setting.micro_batch, levers=list(setting.levers), peak=int(chosen.peak),
                      margin=margin(setting), probe_seconds=time.perf_counter() - started, scoring=chosen.scoring,
                      probes=[{"micro_batch": p.setting.micro_batch, "levers": list(p.setting.levers), "peak": p.peak,
                               "seconds": round(p.seconds, 3)} for p in probes])


def margin_for(setting: Setting, *, device_type: str, heap_fixed: bool) -> float:
    """The margin a setting's probed peak must leave (memory_plan.MARGIN, HEAP_MARGIN): wider on
    the CPU where malloc's heap keeps freed fragments, unless the mmap threshold is fixed."""
    if device_type == "cpu" and not heap_fixed and "malloc_threshold" not in setting.levers:
        return HEAP_MARGIN
    return MARGIN


def refusal(cfg: RunConfig, refused: NoPlanFits, budget: int, longest: int, margin: float) -> str:
    """One line: the smallest peak found, and what would fit."""
    low = refused.smallest
    levers = "".join(f", {LEVER_WORDS[name]}" for name in low.setting.levers)
    smallest = gib(low.peak) if low.peak else "over the machine's memory"
    hints = [f"a shorter --max-length (the longest pair now has {longest} tokens)"]
    if not cfg.lora.lora_r:
        hints.append("LoRA (--lora-r 16: no gradients or optimizer state for the full weights)")
    if cfg.speed.reference == "live":
        hints.append("a precomputed reference (--reference precomputed: no reference model in memory)")
    need = f"; a budget of {gib(low.peak / (1 - margin))} would fit it" if low.peak else ""
    return (f"--memory-budget {cfg.scale.memory_budget} ({gib(budget)}): no plan fits; the smallest peak found is "
            f"{smallest} (micro-batch 1{levers}, margin {margin:.0%}){need}; to fit, try {'; '.join(hints)}")
