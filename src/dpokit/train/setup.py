"""What a run builds before its first step, in the order `train` calls it: the tokenizer (and the
length it allows), the tokenized pairs and the step counts, the policy (and the reference's
weights fingerprint), the scorer with its reference, the optimizer, schedule and loss scaler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dpokit.config import (
    DataConfig,
    LoraSection,
    LossConfig,
    ModelConfig,
    RunConfig,
    ScaleConfig,
    TrainConfig,
)
from dpokit.data import PairTokenizer, TokenizedPair, load_tokenized_pairs
from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.losses import get_loss, needs_reference
from dpokit.model.load import (
    build_reference,
    check_model_source,
    frozen_reference,
    load_model_config,
    load_policy,
    load_tokenizer,
    prepare_policy,
)
from dpokit.model.reference import data_fingerprint, run_reference_weights
from dpokit.scoring import PairScorer, build_scorer
from dpokit.settings_checks import fit_max_length, warn_warmup
from dpokit.train.distributed import Distributed
from dpokit.train.optim import build_optimizer, build_scheduler, warmup_steps
from dpokit.train.shards import pairs_the_run_uses
from dpokit.train.step import TrainingParts
from dpokit.train.wrap import grad_scaler, parallelize


@dataclass
class RunData:
    """The run's tokenized pairs and the step counts they give."""

    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    fingerprint: str  # of the training pairs, checked on resume and keying the reference cache
    global_batch: int  # pairs per optimizer step over all ranks
    steps_per_epoch: int
    total_steps: int
    counts: dict = field(default_factory=dict)  # the training data's rows read, kept, cut, skipped


def load_run_tokenizer(*, model: ModelConfig, data: DataConfig, log: Log):
    """The tokenizer, after checking the model sources (local paths first; offline fails at once);
    caps `data.max_length` (with one line) at the positions the model has."""
    for name in (model.model, model.reference_model):
        if name:
            check_model_source(name)
    tokenizer = load_tokenizer(model.tokenizer or model.model, model.trust_remote_code)
    data.max_length = fit_max_length(data.max_length, data.max_prompt_length,
                                     load_model_config(model.model, model.trust_remote_code), tokenizer, log)
    return tokenizer


def load_run_data(tokenizer, *, data: DataConfig, train: TrainConfig, world_size: int, log: Log,
                  notice: Log | None = None) -> RunData:
    """The tokenized pairs and step counts; `notice` takes the warm-up warning (default: `log`)."""
    pair_tokenizer = PairTokenizer.from_config(tokenizer, data)
    counts: dict = {}
    train_pairs = load_tokenized_pairs(data.data, pair_tokenizer, log, data, counts)
    eval_pairs = load_tokenized_pairs(data.eval_data, pair_tokenizer, log, data) if data.eval_data else []
    global_batch = train.batch_size * train.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(len(train_pairs) / global_batch)
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    warn_warmup(warmup_steps(train, total_steps), total_steps, train.learning_rate, notice or log)
    return RunData(train_pairs, eval_pairs, data_fingerprint(train_pairs), global_batch, steps_per_epoch, total_steps,
                   counts)


def load_run_policy(*, model: ModelConfig, lora: LoraSection, loss: LossConfig, scale: ScaleConfig,
                    device: torch.device, ctx: Distributed) -> tuple[torch.nn.Module, str | None]:
    """The policy in train mode, and the reference's weights fingerprint (the cache key's, computed
    once): rank 0 alone checks a resume and writes checkpoints, so the other ranks skip hashing."""
    policy = load_policy(model.model, device, model.trust_remote_code, lora.load_in_4bit)
    policy = prepare_policy(policy, lora, scale.gradient_checkpointing, scale.selective_recompute)
    policy.train()
    reference_weights = (run_reference_weights(model.model, model.reference_model, policy)
                         if needs_reference(loss) and ctx.is_main else None)
    return policy, reference_weights


def build_run_scorer(policy: torch.nn.Module, tokenizer, data: RunData, cfg: RunConfig, *, reference_weights: str | None,
                     device: torch.device, ctx: Distributed, log: Log, output: Path,
                     reference_cache: str | None, memory_probe: bool = False) -> PairScorer:
    """Reference log-probs precomputed (and cached) now from the initial weights, for the pairs the
    run will use, or a live reference (see --reference); then the policy (and a live reference)
    wrapped for torchrun. The scorer reads every section but data's, so it takes the tree.
    `output` and `reference_cache`: where the run is being built (a new run is set up beside the
    folder it replaces, train/loop.py), and the cache's place there. `memory_probe`: a
    `--memory-budget` probe's scorer (`build_scorer`)."""
    t = cfg.train
    stateful = [name for name in cfg.loss.loss if get_loss(name).batch_statistics]
    if stateful and ctx.world_size > 1:  # each process would keep its own running statistic
        raise DpokitError(f"--loss {stateful[0]} runs in one process only (not under torchrun) yet")
    used = pairs_the_run_uses(len(data.train_pairs), t.seed, data.total_steps, t.batch_size,
                              t.gradient_accumulation_steps, ctx)
    return build_scorer(
        policy, model=cfg.model, loss=cfg.loss, speed=replace(cfg.speed, reference_cache=reference_cache),
        scale=cfg.scale, lora=cfg.lora, train=t, pad_id=tokenizer.pad_token_id, device=device,
        datasets=[data.train_pairs, data.eval_pairs], needed=[used, None], output=output, log=log,
        world_size=ctx.world_size,
        make_live_reference=lambda: live_reference(policy, model=cfg.model, loss=cfg.loss, device=device),
        reference_weights=reference_weights, wrap=lambda module: parallelize(module, scale=cfg.scale, ctx=ctx),
        memory_probe=memory_probe,
    )


def live_reference(policy: torch.nn.Module, *, model: ModelConfig, loss: LossConfig,
                   device: torch.device) -> torch.nn.Module | None:
    """--reference-model when given (online DPO: the reference stays the starting model while the
    policy starts from the previous round), else the usual one (a frozen copy, or LoRA's base)."""
    if model.reference_model and needs_reference(loss):
        return frozen_reference(load_policy(model.reference_model, device, model.trust_remote_code))
    return build_reference(policy, needs_reference(loss))


def build_training_parts(policy: torch.nn.Module, *, train: TrainConfig, dtype: str, total_steps: int,
                         device: torch.device, ctx: Distributed) -> TrainingParts:
    optimizer = build_optimizer(policy, train)
    return TrainingParts(policy, optimizer, build_scheduler(optimizer, train, total_steps),
                         grad_scaler(device, dtype, ctx), [p for p in policy.parameters() if p.requires_grad])
