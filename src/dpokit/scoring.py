"""Pairs -> batch -> policy (and reference) log-probs -> the configured loss.

The loop hands this class lists of TokenizedPairs and gets losses back. How they are batched
(the layout, chosen per batch under `--layout auto`), how the LM head is applied, and where the
reference log-probs come from (precomputed and cached, a live frozen copy, or none for
reference-free losses) is decided here, once, from the config (`build_scorer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.config import RunConfig
from dpokit.data import TokenizedPair
from dpokit.data.batching import PairBatch, collate, epoch_order, plan_rows
from dpokit.errors import DpokitError
from dpokit.losses import LossOutput, loss_from_config, needs_reference
from dpokit.metrics import PairMetrics
from dpokit.model.attention import layout_blocker
from dpokit.model.layout_guard import check_first_batch
from dpokit.model.load import autocast_context
from dpokit.model.logprobs import PairLogps, configure_forward, model_body, sequence_logps
from dpokit.model.reference import (
    PrecomputedReference,
    precompute_reference,
    reference_fingerprint,
    run_reference_weights,
)


@dataclass
class ScoredBatch:
    out: LossOutput
    policy: PairLogps
    num_tokens: int


class LayoutCost:
    """Relative cost of a batch layout: rows x width x (per-token matmuls + width x attention).

    From the model's shape: per token and layer, the projections and MLP cost about
    2 (4 H^2 + 3 H I) FLOPs and attention about 4 H per key. Padding counts as real work
    (it is computed); the LM head is the same in every layout (scored positions only).
    """

    def __init__(self, config) -> None:
        hidden = getattr(config, "hidden_size", 1024)
        inner = getattr(config, "intermediate_size", None) or 4 * hidden
        self.per_token = 2 * (4 * hidden * hidden + 3 * hidden * inner)
        self.per_key = 4 * hidden

    def __call__(self, row_lengths: list[list[int]]) -> float:
        width = max(sum(row) for row in row_lengths)
        return len(row_lengths) * width * (self.per_token + width * self.per_key)


class PairScorer:
    """Scores lists of pairs: batch layout, policy log-probs, reference log-probs, loss.

    `reference` is None (reference-free loss), an nn.Module (a live frozen copy) or a
    `PrecomputedReference`.
    """

    def __init__(self, cfg: RunConfig, policy, reference, pad_id: int, device: torch.device):
        self.cfg, self.policy, self.reference = cfg, policy, reference
        self.pad_id, self.device = pad_id, device
        self.live_reference = False  # True when `reference` is a model run alongside the policy
        self.reference_fingerprint: str | None = None
        speed = cfg.speed
        self.chunked_head = {"auto": None, "chunked": True, "plain": False}[speed.lm_head]
        if speed.layout == "auto":
            self.layouts = [lay for lay in ("packed", "prefix-shared") if layout_blocker(policy, lay) is None]
            self.layouts = self.layouts or ["padded"]
        else:
            why = layout_blocker(policy, speed.layout)
            if why is not None:
                model_type = getattr(policy.config, "model_type", "this model")
                raise DpokitError(f"--layout {speed.layout} is not exact for {model_type}: {why}")
            self.layouts = [speed.layout]
        self.cost = LayoutCost(getattr(policy, "config", None))

    def batch(self, pairs: Sequence[TokenizedPair]) -> PairBatch:
        """Collate in the configured layout; under auto, the layout the cost model finds cheapest."""
        layout = self.layouts[0]
        if len(self.layouts) > 1:
            pack = self.cfg.speed.pack_length
            layout = min(self.layouts, key=lambda lay: self.cost(plan_rows(pairs, lay, pack)))
        return collate(pairs, self.pad_id, layout, self.cfg.speed.pack_length)

    def logps(self, model, batch: PairBatch) -> PairLogps:
        with autocast_context(self.device, self.cfg.model.dtype):
            return sequence_logps(model, batch, self.chunked_head, self.cfg.speed.lm_head_chunk or None)

    def no_grad_logps(self, pairs: Sequence[TokenizedPair]) -> PairLogps:
        """Policy log-probs without gradients (the precompute pass, where policy == reference)."""
        with torch.no_grad():
            return self.logps(self.policy, self.batch(pairs).to(self.device))

    def __call__(self, pairs: Sequence[TokenizedPair]) -> ScoredBatch:
        batch = self.batch(pairs).to(self.device)
        policy = self.logps(self.policy, batch)
        reference_chosen = reference_rejected = None
        if isinstance(self.reference, PrecomputedReference):
            reference_chosen, reference_rejected = self.reference.lookup(pairs, self.device)
        elif self.reference is not None:
            with torch.no_grad():
                live = self.logps(self.reference, batch)
            reference_chosen, reference_rejected = live.chosen_logps, live.rejected_logps
        out = loss_from_config(
            self.cfg.loss,
            policy_chosen_logps=policy.chosen_logps,
            policy_rejected_logps=policy.rejected_logps,
            reference_chosen_logps=reference_chosen,
            reference_rejected_logps=reference_rejected,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
        )
        return ScoredBatch(out, policy, batch.num_tokens)

    def evaluate(self, pairs: Sequence[TokenizedPair], batch_size: int) -> dict[str, float]:
        """Mean loss, rewards and accuracy on held-out pairs, under TRL's `eval_` names."""
        metrics = PairMetrics(self.cfg.loss.beta)
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                scored = self(pairs[start : start + batch_size])
                metrics.add(scored.out, scored.policy)
        self.policy.train(was_training)
        return metrics.compute(prefix="eval_")


def compile_if_asked(policy: torch.nn.Module, cfg: RunConfig) -> None:
    """torch.compile the model body in place when --compile is given (off by default): the body
    the log-prob path calls, also under peft (whose own `base_model` the chunked head bypasses)."""
    if cfg.speed.compile:
        body = model_body(policy) or policy
        # In place: parameter names and state_dict keys stay as they were.
        body.compile(dynamic=True)


def uses_live_reference(cfg: RunConfig, world_size: int) -> bool:
    """--reference live, or auto where no precomputed cache is built yet (--reference-model, torchrun)."""
    unsupported = [why for why, on in (("--reference-model", bool(cfg.model.reference_model)),
                                       ("torchrun", world_size > 1)) if on]
    if cfg.speed.reference == "precomputed" and unsupported:
        raise DpokitError(f"--reference precomputed is not supported with {unsupported[0]} yet; "
                          "use --reference live (or auto)")
    return cfg.speed.reference == "live" or bool(unsupported)


def build_scorer(
    cfg: RunConfig,
    policy: torch.nn.Module,
    make_live_reference: Callable[[], object],
    pad_id: int,
    device: torch.device,
    datasets: Sequence[Sequence[TokenizedPair]],
    output: Path,
    log: Callable[[str], None] = print,
    world_size: int = 1,
    needed: Sequence[Sequence[int] | None] | None = None,
    reference_weights: str | None = None,
) -> PairScorer:
    """The run's scorer, with its reference ready: cached or precomputed, live, or none.

    Call it while `policy` still holds the initial weights (before any training step or
    checkpoint restore): a cache miss computes the reference log-probs with `policy` itself
    (under LoRA the adapters start at zero, so that is the base model). `make_live_reference`
    builds the live reference only when one is used. `datasets` are every set of pairs the run
    will score (train, eval); `needed[k]`, the indices of dataset k the run will use (None: all),
    limits the precomputed pass to those. `reference_weights` is the reference's weights
    fingerprint when the caller has it already (`run_reference_weights`).
    """
    configure_forward(policy, speed=cfg.speed, scale=cfg.scale, device=device, log=log)
    compile_if_asked(policy, cfg)
    scorer = PairScorer(cfg, policy, None, pad_id, device)
    if world_size > 1:
        # Under torchrun the policy is wrapped (DDP, FSDP2), and only its full forward runs the
        # wrapper's hooks (gradient sync, unsharding): padded batches and the model's own LM head.
        # Packed layouts and the chunked head under torchrun are not done yet.
        if cfg.speed.layout not in ("auto", "padded") or cfg.speed.lm_head == "chunked":
            raise DpokitError("under torchrun only --layout padded and --lm-head plain are supported yet "
                              "(auto picks them)")
        scorer.layouts, scorer.chunked_head = ["padded"], False
    else:
        # Before the reference is precomputed in the same layout: a layout that is not exact here
        # falls back to padded + plain (under auto) before it scores anything.
        train_pairs = datasets[0]
        first = epoch_order(len(train_pairs), cfg.train.seed, 0)[: cfg.train.batch_size]
        check_first_batch(scorer, [train_pairs[i] for i in first], output, log)
    if not needs_reference(cfg.loss):
        return scorer
    if uses_live_reference(cfg, world_size):
        scorer.reference = make_live_reference()
        scorer.live_reference = True
        return scorer
    weights = reference_weights or run_reference_weights(cfg.model.model, None, policy)
    fingerprint = reference_fingerprint(weights, cfg.model.dtype, load_in_4bit=cfg.lora.load_in_4bit,
                                        attention=getattr(getattr(policy, "config", None), "_attn_implementation", None))
    folder = Path(cfg.speed.reference_cache) if cfg.speed.reference_cache else output / "reference-cache"
    was_training = policy.training
    policy.eval()
    try:
        scorer.reference = precompute_reference(
            scorer.no_grad_logps, datasets, fingerprint, folder, 2 * cfg.train.batch_size, log, needed
        )
    finally:
        policy.train(was_training)
    scorer.reference_fingerprint = fingerprint["weights"]
    return scorer
