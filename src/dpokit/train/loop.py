"""The DPO training loop, readable top to bottom.

Phases of each optimizer step, in order: batches -> policy (and reference) log-probs -> loss
-> backward (accumulated) -> clip -> step -> schedule -> log -> eval. Host syncs happen only
when logging.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpokit.config import RunConfig, dump_yaml
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.batching import epoch_order, step_batches
from dpokit.errors import DpokitError
from dpokit.io import JsonlWriter, atomic_save_pretrained, atomic_write_text
from dpokit.metrics import PairMetrics
from dpokit.models import load_policy, load_tokenizer, resolve_device
from dpokit.train.optim import build_optimizer, build_scheduler
from dpokit.train.scoring import build_scorer

Log = Callable[[str], None]


@dataclass
class TrainResult:
    output: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output(cfg: RunConfig) -> Path:
    """Refuse to mix a new run into a non-empty folder unless --overwrite is given."""
    output = Path(cfg.train.output)
    if output.exists() and not output.is_dir():
        raise DpokitError(f"--output {output} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not cfg.train.overwrite:
        raise DpokitError(f"--output {output} is not empty; choose a new folder or pass --overwrite")
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.jsonl").unlink(missing_ok=True)
    return output


def train(cfg: RunConfig, log: Log = print) -> TrainResult:
    t = cfg.train
    output = prepare_output(cfg)
    device = resolve_device(cfg.model.device)
    seed_everything(t.seed)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.model, cfg.model.trust_remote_code)
    pair_tokenizer = PairTokenizer(tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    train_pairs = load_tokenized_pairs(cfg.data.data, pair_tokenizer, log)
    eval_pairs = load_tokenized_pairs(cfg.data.eval_data, pair_tokenizer, log) if cfg.data.eval_data else []

    policy = load_policy(cfg.model.model, device, cfg.model.trust_remote_code)
    policy.train()
    # Reference log-probs precomputed (and cached) now, or a live frozen copy: see --reference.
    scorer = build_scorer(cfg, policy, tokenizer.pad_token_id, device, [train_pairs, eval_pairs], output, log)

    steps_per_epoch = math.ceil(len(train_pairs) / cfg.global_batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    params = [p for p in policy.parameters() if p.requires_grad]
    atomic_write_text(output / "dpokit_config.yaml", dump_yaml(cfg))
    log(
        f"training {cfg.model.model} on {device} ({cfg.model.dtype}): {len(train_pairs)} pairs, "
        f"global batch {cfg.global_batch_size} = {t.batch_size} x {t.gradient_accumulation_steps} "
        f"accumulation, {total_steps} steps, loss {cfg.loss.loss}, beta {cfg.loss.beta}"
    )

    metrics_file = JsonlWriter(output / "metrics.jsonl")
    show_bar = t.progress == "on" or (t.progress == "auto" and sys.stderr.isatty())
    bar = tqdm(total=total_steps, desc="dpo", unit="step", disable=not show_bar, dynamic_ncols=True)
    result = TrainResult(output=output, steps=total_steps)
    window = _Window()
    step, epoch = 0, 0
    if eval_pairs and t.eval_every:
        # Step 0: the policy equals the reference, so every reward is 0 - the baseline to beat.
        record = {"step": 0, "epoch": 0.0, **scorer.evaluate(eval_pairs, t.batch_size)}
        metrics_file.write(record)
        result.history.append(record)
    while step < total_steps:
        for micro_batches in step_batches(epoch_order(len(train_pairs), t.seed, epoch), t.batch_size,
                                          t.gradient_accumulation_steps):
            # --- forward and backward over the step's micro-batches -------------------------
            pairs_in_step = sum(len(mb) for mb in micro_batches)
            for indices in micro_batches:
                scored = scorer([train_pairs[i] for i in indices])
                # Sum over the step's pairs / their count: accumulation never changes the update.
                (scored.out.losses.sum() / pairs_in_step).backward()
                window.metrics.add(scored.out, scored.policy)
                window.tokens += scored.num_tokens
            # --- clip, step, schedule ------------------------------------------------------
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            window.grad_norms.append(grad_norm.detach())
            window.learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.steps += 1
            bar.update(1)
            # --- log and evaluate ----------------------------------------------------------
            if step % t.log_every == 0 or step == total_steps:
                record = window.flush(step, step / steps_per_epoch)
                _check_finite(record, step)
                if eval_pairs and t.eval_every and step % t.eval_every == 0 and step != total_steps:
                    record.update(scorer.evaluate(eval_pairs, t.batch_size))
                metrics_file.write(record)
                result.history.append(record)
                _report(record, bar, show_bar, log, total_steps)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()

    if eval_pairs:
        result.final_eval = scorer.evaluate(eval_pairs, t.batch_size)
        final = {"step": step, "epoch": step / steps_per_epoch, **result.final_eval}
        metrics_file.write(final)
        result.history.append(final)
        log("final eval: " + _fmt(result.final_eval))
    metrics_file.close()
    atomic_save_pretrained(output, policy, tokenizer)
    log(f"saved the trained policy and its tokenizer to {output}")
    return result


class _Window:
    """What happened since the last log line: metrics, grad norms, tokens, wall time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.metrics = PairMetrics()
        self.grad_norms: list[torch.Tensor] = []
        self.tokens = 0
        self.steps = 0
        self.learning_rate = 0.0
        self.started = time.perf_counter()

    def flush(self, step: int, epoch: float) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {"step": step, "epoch": round(epoch, 4), **self.metrics.compute()}
        record["grad_norm"] = torch.stack(self.grad_norms).float().mean().item()
        record["learning_rate"] = self.learning_rate
        record["throughput/pairs_per_s"] = self.metrics.pairs / elapsed
        record["throughput/tokens_per_s"] = self.tokens / elapsed
        if torch.cuda.is_available():
            record["memory/peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.reset()
        return record


def _check_finite(record: dict, step: int) -> None:
    for name in ("loss", "grad_norm"):
        if not math.isfinite(record[name]):
            raise DpokitError(
                f"step {step}: {name} is {record[name]}; lower --learning-rate or check the data "
                "(the model was not saved)"
            )


def _fmt(record: dict) -> str:
    keys = [k for k in record if "loss" in k or "accuracies" in k or "margins" in k]
    return ", ".join(f"{k} {record[k]:.4f}" for k in keys)


def _report(record: dict, bar: tqdm, show_bar: bool, log: Log, total: int) -> None:
    if show_bar:
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
    else:
        log(f"step {record['step']}/{total}: {_fmt(record)}, {record['throughput/pairs_per_s']:.1f} pairs/s")
