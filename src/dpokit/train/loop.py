"""The DPO training loop, readable top to bottom.

`train` sets up (tokenizer and pairs, policy and reference, scorer, optimizer and schedule,
resume: train/setup.py), then runs each optimizer step as: this rank's batches -> `train_step`
(train/step.py: forward, loss, backward accumulated, finiteness check, clip, optimizer step,
schedule) -> log -> eval -> checkpoint; then saves the final model. The host syncs of a step are
listed in train/step.py: its body reads the device once. It writes no report: the caller does
(`dpokit train` after `train()` returns), so training never imports evaluation or plotting.

Under torchrun every process runs this same loop on its share of each step (train/shards.py);
two tiny all-reduces per step make the ranks agree on finiteness and on stopping. The strategy
(DDP, FSDP2) is chosen once in `parallelize` (train/wrap.py); nothing here depends on it.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpokit.config import RunConfig, with_absolute_model_paths
from dpokit.data.order import epoch_order
from dpokit.folder_swap import Replacement, locked_folder
from dpokit.hub import check_push_possible, push_run
from dpokit.io import RUN_LOG_FILE, FolderLock, JsonlWriter, Log, counted, shows_progress
from dpokit.model.reference import reference_sync_due, sync_reference
from dpokit.model_card import write_model_card
from dpokit.paths import check_run_paths
from dpokit.runinfo import write_run_summary
from dpokit.scoring import PairScorer
from dpokit.settings_checks import warn_idle_options
from dpokit.trackers import Trackers, open_trackers, require_trackers
from dpokit.train import checkpoint as ckpt
from dpokit.train.distributed import Distributed, init_distributed, teardown
from dpokit.train.memory_budget import check_probed_path, plan_run_memory
from dpokit.train.metrics_window import MetricsWindow, add_drift, check_finite_record, describe
from dpokit.train.run_folder import check_output, save_final_model, start_run_files
from dpokit.train.run_log import RunLog
from dpokit.train.setup import (
    RunData,
    build_run_scorer,
    build_training_parts,
    load_run_data,
    load_run_policy,
    load_run_tokenizer,
)
from dpokit.train.shards import rank_steps
from dpokit.train.signals import StopRequest
from dpokit.train.step import StepOutcome, TrainingParts, train_step


@dataclass
class TrainResult:
    output: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    is_main: bool = True  # this process wrote the run folder (rank 0, or the only process)
    trackers: Trackers | None = None  # --report-to, still open: the caller adds the report's pictures, then finishes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig, log: Log = print, *, notice: Log | None = None,
          within: Replacement | None = None) -> TrainResult:
    """Run one training job: a single process, or one rank of a torchrun launch. `notice` takes
    the notes on settings (a length capped, an idle option, a warm-up past the run): a command
    training several runs passes one `io.SaidOnce` to all of them (default: `log`). `within`: the
    replacement of a folder above (a sweep's root), committed at this run's first checkpoint."""
    check_run_paths(cfg)  # before anything else, the lock file included: an output never lands on an input
    require_trackers(cfg.train.report_to)  # a missing tracker or an impossible push: refused before any work
    if cfg.train.push_to_hub:
        check_push_possible(cfg.train.push_to_hub)
    ctx, device = init_distributed(cfg.model.device)
    try:
        # One writer per run folder: a second train/resume on it is refused while this one lives.
        with locked_folder(cfg.train.output, log=log) if ctx.is_main else nullcontext() as lock:
            return _train(cfg, ctx.main_only(log), ctx.main_only(notice) if notice else None, ctx, device, lock,
                          within)
    finally:
        teardown(ctx)


def _train(cfg: RunConfig, log: Log, notice: Log | None, ctx: Distributed, device: torch.device, lock: FolderLock | None,
           within: Replacement | None) -> TrainResult:
    """Every check that needs no training runs before the folder is touched (settings, data, model,
    LoRA, the first-batch guard, the reference pass); a new run is set up beside what the folder
    holds (folder_swap) and swapped in at the end of setup; what it replaces stays until the new
    run's first checkpoint."""
    started = time.perf_counter()
    log = RunLog(log) if ctx.is_main else log  # the console and, once the folder is ready, train.log
    notice = notice or log  # a command's shared notes (SaidOnce) go to its console
    cfg = with_absolute_model_paths(cfg)  # the saved config must name them from any directory
    tokenizer = load_run_tokenizer(model=cfg.model, data=cfg.data, log=notice)
    warn_idle_options(cfg, notice)
    resume_from = ckpt.find_resume(cfg)
    if ctx.is_main:  # one rank checks the folder and writes it
        check_output(cfg.train, resuming=resume_from is not None)
    with Replacement(cfg.train.output, lock, replace=resume_from is None, within=within, log=log) as folder:
        return _set_up_and_run(cfg, log, notice, ctx, device, resume_from, folder, tokenizer, started)


def _set_up_and_run(cfg: RunConfig, log: Log, notice: Log, ctx: Distributed, device: torch.device,
                    resume_from: Path | None, folder: Replacement, tokenizer, started: float) -> TrainResult:
    seed_everything(cfg.train.seed)  # the same on every rank: identical initialisation (LoRA adapters too)

    data = load_run_data(tokenizer, data=cfg.data, train=cfg.train, world_size=ctx.world_size, log=log,
                         notice=notice)
    if resume_from is not None:  # before any heavy work: a refused resume costs seconds
        ckpt.check_resume_data(resume_from, data.fingerprint, data.global_batch)
    cfg, memory_plan = plan_run_memory(cfg, data, device=device, resume_from=resume_from, world_size=ctx.world_size,
                                       where=folder.where, log=log)  # --memory-budget (or cfg as it is, None)
    policy, reference_weights = load_run_policy(model=cfg.model, lora=cfg.lora, loss=cfg.loss, device=device,
                                                scale=cfg.scale, ctx=ctx)
    if resume_from is not None:
        ckpt.check_resume_reference(resume_from, reference_weights, cfg.model.reference_model or cfg.model.model)
    # The first-batch guard's record and the reference cache go where the new run is being built.
    scorer = build_run_scorer(policy, tokenizer, data, cfg, reference_weights=reference_weights, device=device,
                              ctx=ctx, log=folder.relabel(log), output=folder.where,
                              reference_cache=folder.place(cfg.speed.reference_cache))
    check_probed_path(memory_plan, scorer)
    parts = build_training_parts(scorer.policy, train=cfg.train, dtype=cfg.model.dtype, total_steps=data.total_steps,
                                 device=device, ctx=ctx)
    fresh = ckpt.TrainState(data_fingerprint=data.fingerprint, reference_fingerprint=reference_weights,
                            global_batch_size=data.global_batch)
    state = ckpt.start_state(resume_from, fresh, parts.policy, parts.optimizer, parts.scheduler, ctx, parts.scaler,
                             synced_reference(scorer, cfg))
    scorer.loss.load_state_dict(state.loss_state)  # the loss's running statistics, from the checkpoint
    if resume_from is not None:
        log(f"resuming from {resume_from} at step {state.step}/{data.total_steps}")
    output = Path(cfg.train.output)
    if ctx.is_main:  # rank 0 alone writes files: the new run's config, then the new run in place
        start_run_files(folder.where, cfg, state.step if resume_from is not None else None)
        folder.swap_in()
    ctx.barrier()
    if isinstance(log, RunLog):  # rank 0: the folder now holds this run, and its log file with it
        log.attach(output / RUN_LOG_FILE, resumed=resume_from is not None)
    log(_run_line(cfg, data, device, ctx))

    run = _Run(cfg, data, scorer, parts, state, output=output, ctx=ctx, log=log, started=started, folder=folder)
    try:
        run.steps()
        return run.finish(tokenizer, lora=bool(cfg.lora.lora_r))
    except BaseException:
        if run.trackers is not None:  # what was logged stays readable in each tracker
            run.trackers.finish()
        raise


def synced_reference(scorer: PairScorer, cfg: RunConfig) -> torch.nn.Module | None:
    """The live reference when TR-DPO updates it (--sync-reference-steps), else None: its weights
    are then part of the run's state, in every checkpoint."""
    return scorer.reference if cfg.loss.sync_reference_steps else None


def _run_line(cfg: RunConfig, data: RunData, device: torch.device, ctx: Distributed) -> str:
    t = cfg.train
    processes = f" x {ctx.world_size} processes ({cfg.scale.parallel})" if ctx.world_size > 1 else ""
    lora = f", LoRA r={cfg.lora.lora_r}" if cfg.lora.lora_r else ""
    return (f"training {cfg.model.model} on {device} ({cfg.model.dtype}{lora}): {counted(len(data.train_pairs), 'pair')}, "
            f"global batch {data.global_batch} = {t.batch_size} x {t.gradient_accumulation_steps} "
            f"accumulation{processes}, {counted(data.total_steps, 'step')}, loss {cfg.loss.loss_spec}, beta {cfg.loss.beta}")


class _Run:
    """A run once set up: its steps, what each one records, its checkpoints, its end."""

    def __init__(self, cfg: RunConfig, data: RunData, scorer: PairScorer, parts: TrainingParts,
                 state: ckpt.TrainState, *, output: Path, ctx: Distributed, log: Log, started: float,
                 folder: Replacement) -> None:
        self.cfg, self.t = cfg, cfg.train  # the whole config only for the checkpoints, which hold it
        self.folder = folder  # what the run replaces goes at its first checkpoint
        self.data, self.scorer, self.parts, self.state = data, scorer, parts, state
        self.reference = synced_reference(scorer, cfg)
        self.output, self.ctx, self.log, self.started = output, ctx, log, started
        self.metrics_file = JsonlWriter(output / "metrics.jsonl") if ctx.is_main else None
        self.trackers = (open_trackers(cfg.train.report_to, run_dir=output, run_name=output.name, config=cfg.to_dict(),
                                       log=log) if ctx.is_main and cfg.train.report_to != ("none",) else None)
        progress = cfg.train.progress
        self.show_bar = ctx.is_main and shows_progress(progress)
        self.bar = tqdm(total=data.total_steps, initial=state.step, desc="dpo", unit="step",
                        disable=not self.show_bar, dynamic_ncols=True)

    def steps(self) -> None:
        """Every optimizer step left, epoch by epoch in the seeded order, from where the state is."""
        t, data, state = self.t, self.data, self.state
        if data.eval_pairs and t.eval_every and state.step == 0:
            # Step 0: the policy equals the reference, so every reward is 0 - the baseline to beat.
            self.record({"step": 0, "epoch": 0.0, **self.scorer.evaluate(data.eval_pairs, t.batch_size)})
        self.window = MetricsWindow(self.cfg.loss.beta)  # its clock starts after the step-0 evaluation
        with StopRequest() as stop:
            while state.step < data.total_steps:
                order = epoch_order(len(data.train_pairs), t.seed, state.epoch)
                steps = rank_steps(order, t.batch_size, t.gradient_accumulation_steps, self.ctx)
                for pairs_in_step, micro_batches in islice(steps, state.step_in_epoch, None):
                    batches = [[data.train_pairs[i] for i in indices] for indices in micro_batches]
                    outcome = train_step(self.parts, self.scorer, batches, data.train_pairs[order[0]],
                                         pairs_in_step=pairs_in_step, train=t, ctx=self.ctx, step=state.step + 1,
                                         output=self.output, log=self.log)
                    # Ranks must agree on stopping, or one waits forever for the others.
                    signal_seen = self.ctx.max_int(stop.requested or 0)
                    self.count(outcome)
                    self.sync_reference()
                    self.log_and_evaluate()
                    self.checkpoint(signal_seen, stop)
                    if state.step == data.total_steps:
                        break
                else:  # the epoch's data is used up
                    state.epoch += 1
                    state.step_in_epoch = 0
        self.bar.close()

    def count(self, outcome: StepOutcome) -> None:
        """The step into the state and the metrics window (a skipped step into the counts only)."""
        state = self.state
        if outcome.finite:
            self.window.add_step(outcome.scored, outcome.grad_norm, outcome.learning_rate)
        state.nonfinite_skipped += outcome.skipped_nonfinite + outcome.scaler_skipped
        if outcome.scaler_skipped:
            self.record(_scaler_skip_record(state.step + 1, (state.step + 1) / self.data.steps_per_epoch,
                                            self.parts.scaler, self.log))
        state.step += 1
        state.step_in_epoch += 1
        self.bar.update(1)

    def sync_reference(self) -> None:
        """TR-DPO: after every τ-th step the reference moves toward the policy, before this step's
        evaluation and checkpoint (which therefore see the updated reference), as in TRL."""
        lo = self.cfg.loss
        if self.reference is not None and reference_sync_due(self.state.step, lo.sync_reference_steps):
            sync_reference(self.reference, self.parts.policy, lo.sync_reference_alpha)

    def log_and_evaluate(self) -> None:
        step, t, data = self.state.step, self.t, self.data
        last = step == data.total_steps
        entry = {}
        if step % t.log_every == 0 or last:
            entry = self.window.flush(step, step / data.steps_per_epoch, self.ctx.sum)
            if entry:
                check_finite_record(entry, step)
                add_drift(entry, self.state.history)
        # Evaluations keep their own cadence, whatever --log-every is (the last one comes in `finish`).
        if data.eval_pairs and t.eval_every and step % t.eval_every == 0 and not last:
            entry = entry or {"step": step, "epoch": round(step / data.steps_per_epoch, 4)}
            with self.window.paused():  # training throughput leaves evaluation out
                entry.update(self.scorer.evaluate(data.eval_pairs, t.batch_size))
        if entry:
            self.record(entry)
            _report(entry, self.bar, self.show_bar, self.log, data.total_steps)

    def checkpoint(self, signal_seen: int, stop: StopRequest) -> None:
        """Every --save-every steps (not after the last: `finish` saves the model); at once on a stop
        signal, then stop, after the last step too: a signal is never swallowed (online DPO would
        otherwise carry on into its next round), and resuming that checkpoint only finishes."""
        step = self.state.step
        last = step == self.data.total_steps
        if self.t.save_every and step % self.t.save_every == 0 and not last:
            with self.window.paused():
                self.save()
        if signal_seen:
            path = self.save()
            self.bar.close()
            stop.requested = signal_seen  # the signal may have reached another rank only
            raise stop.interrupted(step, path)

    def record(self, entry: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(entry)
        if self.trackers is not None:
            self.trackers.log_record(entry)
        self.state.history.append(entry)

    def save(self) -> Path:
        p = self.parts
        self.state.loss_state = self.scorer.loss.state_dict()
        path = ckpt.save_checkpoint(self.output, self.state, self.cfg, p.policy, p.optimizer,
                                    p.scheduler, self.t.keep_checkpoints, self.ctx, p.scaler, self.reference)
        if self.ctx.is_main:  # the new run can continue from here: what it replaces is no longer needed
            self.folder.commit()
        return path

    def finish(self, tokenizer, lora: bool) -> TrainResult:
        """Final evaluation, the last checkpoint, the final model; the result."""
        state, data, log = self.state, self.data, self.log
        result = TrainResult(output=self.output, steps=data.total_steps, nonfinite_skipped=state.nonfinite_skipped,
                             is_main=self.ctx.is_main)
        if data.eval_pairs:
            result.final_eval = self.scorer.evaluate(data.eval_pairs, self.t.batch_size)
            self.record({"step": state.step, "epoch": state.step / data.steps_per_epoch, **result.final_eval})
            log("final eval: " + describe(result.final_eval))
        if self.metrics_file is not None:
            self.metrics_file.close()
        self.save()
        save_final_model(self.output, self.parts.policy, tokenizer, self.ctx)
        if state.nonfinite_skipped:
            log(f"skipped {state.nonfinite_skipped} step(s) with a non-finite loss or gradient")
        what = "LoRA adapter (merge it with dpokit export --merge)" if lora else "policy"
        log(f"saved the trained {what} and its tokenizer to {self.output}")
        if self.ctx.is_main:
            self.describe_run()
        result.history, result.trackers = state.history, self.trackers
        return result

    def describe_run(self) -> None:
        """What the folder tells about itself beyond the model: wall time and data counts, the model
        card; then the push, when asked (checked before training started)."""
        write_run_summary(self.output, wall_seconds=time.perf_counter() - self.started, data=self.data.counts)
        write_model_card(self.output)
        if self.t.push_to_hub:
            push_run(self.output, self.t.push_to_hub, private=self.t.hub_private, log=self.log)


def _scaler_skip_record(step: int, epoch: float, scaler, log: Log) -> dict:
    """The metrics.jsonl line (and console line) of a step the fp16 loss scaler skipped."""
    scale = float(scaler.get_scale())
    log(f"step {step}: the fp16 gradient overflowed; the loss scaler skipped the step and lowered its scale "
        f"to {scale:g}")
    return {"step": step, "epoch": round(epoch, 4), "skipped": "fp16_gradient_overflow", "loss_scale": scale}


def _report(entry: dict, bar: tqdm, show_bar: bool, log: Log, total: int) -> None:
    if "loss" not in entry:  # an evaluation between two log lines
        log(f"step {entry['step']}/{total}: {describe(entry)}")
        return
    if show_bar:
        bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['rewards/accuracies']:.2f}")
    else:
        log(f"step {entry['step']}/{total}: {describe(entry)}, {entry['throughput/pairs_per_s']:.1f} pairs/s")
