"""The DPO training loop, readable top to bottom.

Phases of each optimizer step, in order: batches -> policy (and reference) log-probs -> loss
-> backward (accumulated) -> finiteness check -> clip -> step -> schedule -> log -> eval ->
checkpoint. One host sync per step (the finiteness check, which must precede the update);
everything else is read to the host only when logging.

Under torchrun every process runs this same loop on its share of each step (see
train/parallel.py); two tiny all-reduces per step make the ranks agree on finiteness and on
stopping. The strategy (DDP, FSDP2) is chosen once in `parallelize`; nothing here depends on it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpokit.config import RunConfig, dump_yaml, with_absolute_model_paths
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.batching import epoch_order
from dpokit.errors import DpokitError
from dpokit.io import JsonlWriter, atomic_save_pretrained, atomic_write_text, folder_entries, run_folder_lock
from dpokit.losses import needs_reference
from dpokit.model.load import (
    build_reference,
    check_model_source,
    frozen_reference,
    load_policy,
    load_tokenizer,
    prepare_policy,
)
from dpokit.model.reference import data_fingerprint, run_reference_weights
from dpokit.paths import check_run_paths, clear_for_overwrite
from dpokit.scoring import build_scorer
from dpokit.settings_checks import context_limit, fit_max_length, model_config, warn_idle_options, warn_warmup
from dpokit.train import checkpoint as ckpt
from dpokit.train.metrics_window import MetricsWindow, check_finite_record, describe
from dpokit.train.optim import build_optimizer, build_scheduler, warmup_steps
from dpokit.train.parallel import (
    Distributed,
    clip_grad_norm,
    grad_scaler,
    gradient_sync,
    init_distributed,
    parallelize,
    pretrained_state,
    rank_steps,
    teardown,
    unwrap,
)
from dpokit.train.signals import StopRequest

Log = Callable[[str], None]


@dataclass
class TrainResult:
    output: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output(cfg: RunConfig, resuming: bool) -> Path:
    """Refuse to mix a new run into a folder that holds something else."""
    output = Path(cfg.train.output)
    if output.exists() and not output.is_dir():
        raise DpokitError(f"--output {output} is a file, not a folder")
    if not resuming and output.is_dir() and folder_entries(output) and not cfg.train.overwrite:
        if cfg.train.resume == "auto":
            raise DpokitError(f"--resume auto: {output} holds no complete checkpoint to resume from; "
                              "pass --overwrite to start over there, or choose a new folder")
        what = "holds another dpokit run" if (output / "dpokit_config.yaml").exists() else "is not empty"
        raise DpokitError(
            f"--output {output} {what}; pass --resume auto to continue it, --overwrite to write over it, "
            "or choose a new folder"
        )
    if not resuming and cfg.train.overwrite:
        clear_for_overwrite(output)  # nothing of the previous run may survive beside the new one
    output.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_staging(output)
    return output


def _rewind_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines up to the resumed step, so the file reads as one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):  # a line cut short by the crash
            continue
    atomic_write_text(path, "".join(kept))


def train(cfg: RunConfig, log: Log = print) -> TrainResult:
    """Run one training job: a single process, or one rank of a torchrun launch."""
    check_run_paths(cfg)  # before anything else, the lock file included: an output never lands on an input
    ctx, device = init_distributed(cfg.model.device)
    try:
        # One writer per run folder: a second train/resume on it is refused while this one lives.
        with run_folder_lock(cfg.train.output) if ctx.is_main else nullcontext():
            return _train(cfg, ctx.main_only(log), ctx, device)
    finally:
        teardown(ctx)


def pairs_the_run_uses(num_pairs: int, seed: int, total_steps: int, batch_size: int, accumulation: int,
                       ctx: Distributed) -> list[int] | None:
    """Indices of the training pairs the run's `total_steps` steps will score, by the same seeded
    order and split as the loop (with each epoch's stand-in pair); None when that is all of them."""
    used: set[int] = set()
    steps_left, epoch = total_steps, 0
    while steps_left > 0 and len(used) < num_pairs:
        order = epoch_order(num_pairs, seed, epoch)
        used.add(order[0])  # the stand-in a rank short of pairs scores at weight 0
        for _, micro_batches in islice(rank_steps(order, batch_size, accumulation, ctx), steps_left):
            used.update(i for indices in micro_batches for i in indices)
            steps_left -= 1
        epoch += 1
    return None if len(used) == num_pairs else sorted(used)


def _train(cfg: RunConfig, log: Log, ctx: Distributed, device: torch.device) -> TrainResult:
    cfg = with_absolute_model_paths(cfg)  # the saved config must name them from any directory
    t = cfg.train
    for name in (cfg.model.model, cfg.model.reference_model):  # local paths first; offline fails at once
        if name:
            check_model_source(name)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.model, cfg.model.trust_remote_code)
    limit = context_limit(model_config(cfg.model.model, cfg.model.trust_remote_code), tokenizer)
    cfg.data.max_length = fit_max_length(cfg.data.max_length, cfg.data.max_prompt_length, limit, log)
    warn_idle_options(cfg, log)
    resume_from = ckpt.resolve_resume(cfg)
    if resume_from is not None:
        ckpt.check_resumable(ckpt.saved_config(resume_from), cfg, resume_from)
    if ctx.is_main:  # one rank checks and prepares the folder; the others wait for it
        prepare_output(cfg, resuming=resume_from is not None)
    ctx.barrier()
    output = Path(t.output)
    seed_everything(t.seed)  # the same on every rank: identical initialisation (LoRA adapters too)

    # --- data, models, optimizer ---------------------------------------------------------
    pair_tokenizer = PairTokenizer.from_config(tokenizer, cfg.data)
    train_pairs = load_tokenized_pairs(cfg.data.data, pair_tokenizer, log, cfg.data)
    eval_pairs = load_tokenized_pairs(cfg.data.eval_data, pair_tokenizer, log, cfg.data) if cfg.data.eval_data else []

    global_batch = cfg.process_batch_size * ctx.world_size
    steps_per_epoch = math.ceil(len(train_pairs) / global_batch)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warn_warmup(warmup_steps(t, total_steps), total_steps, t.learning_rate, log)
    train_fingerprint = data_fingerprint(train_pairs)
    if resume_from is not None:  # before any heavy work: a refused resume costs seconds
        ckpt.check_resume_data(resume_from, train_fingerprint, global_batch)

    policy = load_policy(cfg.model.model, device, cfg.model.trust_remote_code, cfg.lora.load_in_4bit)
    policy = prepare_policy(policy, cfg.lora, cfg.scale.gradient_checkpointing)
    policy.train()
    # The reference's weights fingerprint (the cache key's, computed once): rank 0 alone checks a
    # resume and writes checkpoints, so the other ranks skip hashing.
    reference_weights = (run_reference_weights(cfg.model.model, cfg.model.reference_model, policy)
                         if needs_reference(cfg.loss) and ctx.is_main else None)
    if resume_from is not None:
        ckpt.check_resume_reference(resume_from, reference_weights, cfg.model.reference_model or cfg.model.model)
    # Reference log-probs precomputed (and cached) now from the initial weights, for the pairs the
    # run will use, or a live reference (see --reference); then the policy (and a live reference)
    # are wrapped for torchrun.
    used = pairs_the_run_uses(len(train_pairs), t.seed, total_steps, t.batch_size, t.gradient_accumulation_steps, ctx)
    scorer = build_scorer(cfg, policy, lambda: _build_reference(cfg, policy, device), tokenizer.pad_token_id,
                          device, [train_pairs, eval_pairs], output, log, ctx.world_size, needed=[used, None],
                          reference_weights=reference_weights)
    policy = scorer.policy = parallelize(policy, cfg, ctx)
    if scorer.live_reference:
        scorer.reference = parallelize(scorer.reference, cfg, ctx)

    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = grad_scaler(device, cfg.model.dtype, ctx)
    params = [p for p in policy.parameters() if p.requires_grad]

    state = ckpt.TrainState(data_fingerprint=train_fingerprint, reference_fingerprint=reference_weights,
                            global_batch_size=global_batch)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, policy, optimizer, scheduler, ctx, scaler)
        state.global_batch_size = global_batch
        log(f"resuming from {resume_from} at step {state.step}/{total_steps}")
    if ctx.is_main:  # rank 0 alone writes files
        if resume_from is not None:
            _rewind_metrics(output / "metrics.jsonl", state.step)
        else:
            (output / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_text(output / "dpokit_config.yaml", dump_yaml(cfg))
    processes = f" x {ctx.world_size} processes ({cfg.scale.parallel})" if ctx.world_size > 1 else ""
    lora = f", LoRA r={cfg.lora.lora_r}" if cfg.lora.lora_r else ""
    log(
        f"training {cfg.model.model} on {device} ({cfg.model.dtype}{lora}): {len(train_pairs)} pairs, "
        f"global batch {global_batch} = {t.batch_size} x {t.gradient_accumulation_steps} "
        f"accumulation{processes}, {total_steps} steps, loss {cfg.loss.loss_spec}, beta {cfg.loss.beta}"
    )

    def save() -> Path:
        return ckpt.save_checkpoint(output, state, cfg, policy, optimizer, scheduler, t.keep_checkpoints,
                                    ctx, scaler)

    def record(entry: dict) -> None:
        if ctx.is_main:
            metrics_file.write(entry)
        state.history.append(entry)

    metrics_file = JsonlWriter(output / "metrics.jsonl") if ctx.is_main else None
    show_bar = ctx.is_main and (t.progress == "on" or (t.progress == "auto" and sys.stderr.isatty()))
    bar = tqdm(total=total_steps, initial=state.step, desc="dpo", unit="step", disable=not show_bar,
               dynamic_ncols=True)
    if eval_pairs and t.eval_every and state.step == 0:
        # Step 0: the policy equals the reference, so every reward is 0 - the baseline to beat.
        record({"step": 0, "epoch": 0.0, **scorer.evaluate(eval_pairs, t.batch_size)})
    window = MetricsWindow(cfg.loss.beta)

    # --- the loop ----------------------------------------------------------------------------
    with StopRequest() as stop:
        while state.step < total_steps:
            order = epoch_order(len(train_pairs), t.seed, state.epoch)
            steps = rank_steps(order, t.batch_size, t.gradient_accumulation_steps, ctx)
            for pairs_in_step, micro_batches in islice(steps, state.step_in_epoch, None):
                # forward and backward over this rank's micro-batches of the step
                # Sum over the step's pairs / their count, so accumulation never changes the update;
                # x world because DDP and FSDP2 average gradients over ranks (sum = world x mean).
                loss_scale = ctx.world_size / pairs_in_step
                scored_batches, step_loss = [], torch.zeros((), device=device)
                for n, indices in enumerate(micro_batches):
                    with gradient_sync(policy, enabled=n == len(micro_batches) - 1):
                        # A rank short of pairs scores a stand-in pair at weight 0: every rank must
                        # join every forward and backward, or the collectives inside them hang.
                        weight = 1.0 if indices else 0.0
                        scored = scorer([train_pairs[i] for i in indices or [order[0]]])
                        loss = scored.out.losses.sum() * (loss_scale * weight)
                        scaler.scale(loss).backward()
                    step_loss += loss.detach()
                    if indices:
                        scored_batches.append(scored)
                # Ranks must agree on finiteness and on stopping, or one waits forever for the others.
                step_loss = ctx.sum(step_loss) / ctx.world_size
                signal_seen = ctx.max_int(stop.requested or 0)
                # finiteness check (must precede the update), clip, step, schedule
                scaler.unscale_(optimizer)
                grad_norm = clip_grad_norm(params, t.max_grad_norm)
                loss_finite, grad_finite = bool(torch.isfinite(step_loss)), bool(torch.isfinite(grad_norm))
                # Under fp16 an overflowing gradient is routine: the scaler skips the step and lowers its scale.
                scaler_skips = loss_finite and not grad_finite and scaler.is_enabled()
                if loss_finite and (grad_finite or scaler_skips):
                    if grad_finite:
                        window.add_step(scored_batches, grad_norm, scheduler.get_last_lr()[0])
                    scaler.step(optimizer)
                else:
                    _handle_nonfinite(t.skip_nonfinite, state.step + 1, step_loss, grad_norm, output, log)
                    state.nonfinite_skipped += 1
                scaler.update()
                if scaler_skips:
                    state.nonfinite_skipped += 1
                    record(_scaler_skip_record(state.step + 1, (state.step + 1) / steps_per_epoch, scaler, log))
                _advance_schedule(scheduler)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                bar.update(1)
                # log, evaluate, checkpoint
                last = state.step == total_steps
                entry = {}
                if state.step % t.log_every == 0 or last:
                    entry = window.flush(state.step, state.step / steps_per_epoch, ctx.sum)
                    if entry:
                        check_finite_record(entry, state.step)
                # Evaluations keep their own cadence, whatever --log-every is (the last one comes below).
                if eval_pairs and t.eval_every and state.step % t.eval_every == 0 and not last:
                    entry = entry or {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4)}
                    with window.paused():  # training throughput leaves evaluation out
                        entry.update(scorer.evaluate(eval_pairs, t.batch_size))
                if entry:
                    record(entry)
                    _report(entry, bar, show_bar, log, total_steps)
                if t.save_every and state.step % t.save_every == 0 and not last:
                    with window.paused():
                        save()
                if signal_seen and not last:
                    path = save()
                    bar.close()
                    stop.requested = signal_seen  # the signal may have reached another rank only
                    raise stop.interrupted(state.step, path)
                if last:
                    break
            else:  # the epoch's data is used up
                state.epoch += 1
                state.step_in_epoch = 0
    bar.close()

    # --- final evaluation and outputs ----------------------------------------------------------
    result = TrainResult(output=output, steps=total_steps, nonfinite_skipped=state.nonfinite_skipped)
    if eval_pairs:
        result.final_eval = scorer.evaluate(eval_pairs, t.batch_size)
        record({"step": state.step, "epoch": state.step / steps_per_epoch, **result.final_eval})
        log("final eval: " + describe(result.final_eval))
    if metrics_file is not None:
        metrics_file.close()
    save()
    full_weights = pretrained_state(policy, ctx)  # a collective under FSDP2
    if ctx.is_main:
        atomic_save_pretrained(output, _Savable(unwrap(policy), full_weights), tokenizer)
    ctx.barrier()
    if state.nonfinite_skipped:
        log(f"skipped {state.nonfinite_skipped} step(s) with a non-finite loss or gradient")
    what = "LoRA adapter (merge it with dpokit export --merge)" if cfg.lora.lora_r else "policy"
    log(f"saved the trained {what} and its tokenizer to {output}")
    if ctx.is_main:
        _write_report(output, log)
    result.history = state.history
    return result


def _build_reference(cfg: RunConfig, policy: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """--reference-model when given (online DPO: the reference stays the starting model while the
    policy starts from the previous round), else the usual one (a frozen copy, or LoRA's base)."""
    if cfg.model.reference_model and needs_reference(cfg.loss):
        return frozen_reference(load_policy(cfg.model.reference_model, device, cfg.model.trust_remote_code))
    return build_reference(policy, needs_reference(cfg.loss))


def _write_report(output: Path, log: Log) -> None:
    """Training curves and report.md; the model is already saved, so a plotting failure only warns."""
    from dpokit.eval.report import write_report

    try:
        log(f"report: {write_report(output)}")
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
        log(f"warning: could not write the report ({type(exc).__name__}: {exc}); run `dpokit report {output}`")


class _Savable:
    """`save_pretrained` with the gathered weights under FSDP2 (None: the module's own)."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, folder) -> None:
        if self.state_dict is None:
            self.model.save_pretrained(folder)
        else:
            self.model.save_pretrained(folder, state_dict=self.state_dict)


def _advance_schedule(scheduler) -> None:
    """One schedule step per optimizer step, taken or skipped: the learning rate follows the step count
    (so a resumed run is exact). PyTorch warns when the first optimizer step was skipped; that is this
    deliberate choice, not a mistake to show users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _scaler_skip_record(step: int, epoch: float, scaler, log: Log) -> dict:
    """The metrics.jsonl line (and console line) of a step the fp16 loss scaler skipped."""
    scale = float(scaler.get_scale())
    log(f"step {step}: the fp16 gradient overflowed; the loss scaler skipped the step and lowered its scale "
        f"to {scale:g}")
    return {"step": step, "epoch": round(epoch, 4), "skipped": "fp16_gradient_overflow", "loss_scale": scale}


def _handle_nonfinite(skip: bool, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, output: Path,
                      log: Log) -> None:
    # Name what is non-finite: a finite loss with an overflowing gradient calls for other remedies.
    if torch.isfinite(loss):
        what = f"gradient (norm {grad_norm.item()}; the loss {loss.item():.6g} is finite)"
    else:
        what = f"loss {loss.item()}, gradient norm {grad_norm.item()}"
    if skip:
        log(f"step {step}: non-finite {what}; step skipped (--skip-nonfinite)")
        return
    found = ckpt.list_checkpoints(output)
    last_good = f"; the last good checkpoint is {found[-1]} (--resume auto)" if found else ""
    raise DpokitError(
        f"step {step}: non-finite {what}; stopped before updating the weights{last_good}. "
        "Lower --learning-rate, check the data, or pass --skip-nonfinite"
    )


def _report(entry: dict, bar: tqdm, show_bar: bool, log: Log, total: int) -> None:
    if "loss" not in entry:  # an evaluation between two log lines
        log(f"step {entry['step']}/{total}: {describe(entry)}")
        return
    if show_bar:
        bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['rewards/accuracies']:.2f}")
    else:
        log(f"step {entry['step']}/{total}: {describe(entry)}, {entry['throughput/pairs_per_s']:.1f} pairs/s")
