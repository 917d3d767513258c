"""Pairs -> batch -> policy (and reference) log-probs -> the configured loss.

The loop hands this class lists of TokenizedPairs and gets losses back. How they are batched
(the layout, chosen per batch under `--layout auto`), how the LM head is applied, and where the
reference log-probs come from (precomputed and cached, a live frozen copy, or none for
reference-free losses) is decided here, once, from the config (`build_scorer`), and checked on
the first batch (`layout_guard`) for training and for `dpokit evaluate` alike (`guarded_scorer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.config import LoraSection, LossConfig, ModelConfig, ScaleConfig, SpeedConfig, TrainConfig
from dpokit.data import TokenizedPair
from dpokit.data.batching import PairBatch, collate, most_mask_cells, plan_rows
from dpokit.data.order import epoch_order
from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.losses import LossOutput, compile_loss, needs_reference
from dpokit.metrics import PairMetrics
from dpokit.model.attention import PACKED_LAYOUTS
from dpokit.model.capability import ModelForward, configure_forward, describe_forward
from dpokit.model.host_memory import apply_mmap_setting
from dpokit.model.layout_guard import check_first_batch
from dpokit.model.load import autocast_context
from dpokit.model.logprobs import PairLogps, model_body, sequence_logps
from dpokit.model.reference import (
    PrecomputedReference,
    check_sync_compatible,
    precompute_reference,
    reference_fingerprint,
    run_reference_weights,
)
from dpokit.model.router_loss import RouterLoss, router_loss_for, with_router_loss


@dataclass
class ScoredBatch:
    out: LossOutput
    policy: PairLogps
    num_tokens: int


LM_HEADS = {"auto": None, "chunked": True, "plain": False}  # --lm-head -> `sequence_logps(chunked_head=...)`


def packed_candidates(speed: SpeedConfig) -> list[str]:
    """The packed layouts `--layout` may use: both under auto, the one asked for, none for padded."""
    return list(PACKED_LAYOUTS) if speed.layout == "auto" else [lay for lay in PACKED_LAYOUTS if lay == speed.layout]


def allowed_layouts(speed: SpeedConfig, forwards: Sequence[ModelForward], model_type: str) -> list[str]:
    """The layouts `--layout` allows for the models of `forwards` (every model a batch goes through):
    under auto every layout exact for all of them (padded when none is); an explicit one or an error."""
    if speed.layout == "auto":
        return [lay for lay in PACKED_LAYOUTS if not any(lay in f.refusals for f in forwards)] or ["padded"]
    why = next((f.refusals[speed.layout] for f in forwards if speed.layout in f.refusals), None)
    if why is not None:
        raise DpokitError(f"--layout {speed.layout} is not exact for {model_type}: {why}")
    return [speed.layout]


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

    `policy` is the model as trained (wrapped under torchrun); `reference` is None
    (reference-free loss), a model (a live frozen copy, LoRA's base, `--reference-model`) or a
    `PrecomputedReference`. `forwards` holds what the run found about each model ("policy",
    "reference": `capability.configure_forward`); a model without one is probed now.
    `layouts` and `chunked_head`, when given, are a choice made already (`build_scorer` checks
    it on the first batch); otherwise the layouts `speed` allows for the models and their LM head.
    """

    def __init__(self, policy, reference=None, *, loss: LossConfig, speed: SpeedConfig, dtype: str, pad_id: int,
                 device: torch.device, layouts: Sequence[str] | None = None, chunked_head: bool | None = None,
                 forwards: dict[str, ModelForward] | None = None, router: RouterLoss | None = None):
        self.policy, self.reference = policy, reference
        self.router = router  # the MoE load-balancing term: the policy's forward only, never the reference's
        self.loss = compile_loss(loss)  # names, weights and options resolved once per run
        self.beta, self.speed, self.dtype = loss.beta, speed, dtype
        self.ld_alpha, self.wpo = loss.ld_alpha, loss.wpo  # act in the log-prob reduction (`sequence_logps`)
        self.pad_id, self.device = pad_id, device
        self.forwards = {role: (forwards or {}).get(role) or describe_forward(model, packed_candidates(speed))
                         for role, model in self.models().items()}
        if layouts is None:
            model_type = getattr(getattr(policy, "config", None), "model_type", "this model")
            self.layouts = allowed_layouts(speed, list(self.forwards.values()), model_type)
            self.chunked_head = LM_HEADS[speed.lm_head]
        else:
            self.layouts, self.chunked_head = list(layouts), chunked_head
        self.cost = LayoutCost(getattr(policy, "config", None))

    def models(self) -> dict[str, object]:
        """The models batches go through: "policy", and "reference" when it is run live."""
        live = self.reference is not None and not isinstance(self.reference, PrecomputedReference)
        return {"policy": self.policy, **({"reference": self.reference} if live else {})}

    def forward_of(self, model) -> ModelForward:
        return self.forwards["reference" if model is self.reference else "policy"]

    def batch(self, pairs: Sequence[TokenizedPair]) -> PairBatch:
        """Collate in the configured layout; with several, the one the cost model finds cheapest here."""
        layout = self.layouts[0] if len(self.layouts) == 1 else self.cheapest_layout([pairs])
        return collate(pairs, self.pad_id, layout, self.speed.pack_length)

    def cheapest_layout(self, batches: Sequence[Sequence[TokenizedPair]]) -> str:
        """The allowed layout the cost model finds cheapest over `batches` together."""
        pack = self.speed.pack_length
        return min(self.layouts, key=lambda lay: sum(self.cost(plan_rows(pairs, lay, pack)) for pairs in batches))

    def settle_layout(self, batches: Sequence[Sequence[TokenizedPair]]) -> None:
        """One layout for a run (`--layout auto`): the cheapest over its batches, so that every
        batch takes the layout the first-batch check runs (and the check runs one, not two)."""
        if len(self.layouts) > 1 and batches:
            self.layouts = [self.cheapest_layout(batches)]

    def logps(self, model, batch: PairBatch, *, wpo_weights: bool = False, router: RouterLoss | None = None
              ) -> PairLogps:
        """Summed log-probs of `model` (policy or reference: both under --ld-alpha), WPO's weights
        and the router's load-balancing loss when asked."""
        with autocast_context(self.device, self.dtype):
            return sequence_logps(model, batch, self.chunked_head, self.speed.lm_head_chunk or None,
                                  ld_alpha=self.ld_alpha, wpo_weights=wpo_weights, forward=self.forward_of(model),
                                  router=router)

    def no_grad_logps(self, pairs: Sequence[TokenizedPair]) -> PairLogps:
        """Policy log-probs without gradients (the precompute pass, where policy == reference)."""
        with torch.no_grad():
            return self.logps(self.policy, self.batch(pairs).to(self.device))

    def __call__(self, pairs: Sequence[TokenizedPair]) -> ScoredBatch:
        batch = self.batch(pairs).to(self.device)
        policy = self.logps(self.policy, batch, wpo_weights=self.wpo, router=self.router)
        reference_chosen = reference_rejected = None
        if isinstance(self.reference, PrecomputedReference):
            reference_chosen, reference_rejected = self.reference.lookup(pairs, self.device)
        elif self.reference is not None:
            with torch.no_grad():
                live = self.logps(self.reference, batch)
            reference_chosen, reference_rejected = live.chosen_logps, live.rejected_logps
        out = self.loss(
            policy_chosen_logps=policy.chosen_logps,
            policy_rejected_logps=policy.rejected_logps,
            reference_chosen_logps=reference_chosen,
            reference_rejected_logps=reference_rejected,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
            pair_weights=policy.pair_weights,
        )
        return ScoredBatch(with_router_loss(out, policy.router, self.router), policy, batch.num_tokens)

    def evaluate(self, pairs: Sequence[TokenizedPair], batch_size: int) -> dict[str, float]:
        """Mean loss, rewards and accuracy on held-out pairs, under TRL's `eval_` names."""
        metrics = PairMetrics(self.beta)
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                scored = self(pairs[start : start + batch_size])
                metrics.add(scored.out, scored.policy)
        self.policy.train(was_training)
        return metrics.compute(prefix="eval_")


def compile_if_asked(policy: torch.nn.Module, speed: SpeedConfig) -> None:
    """torch.compile the model body in place when --compile is given (off by default): the body
    the log-prob path calls, also under peft (whose own `base_model` the chunked head bypasses)."""
    if speed.compile:
        body = model_body(policy) or policy
        # In place: parameter names and state_dict keys stay as they were.
        body.compile(dynamic=True)


def uses_live_reference(model: ModelConfig, speed: SpeedConfig, world_size: int, *, synced: bool = False) -> bool:
    """--reference live, or auto where no precomputed cache is built yet (--reference-model, torchrun)
    or where none can be (`synced`: TR-DPO's --sync-reference-steps updates the reference weights)."""
    if synced and world_size > 1:  # each rank would have to update (and checkpoint) its copy or shard
        raise DpokitError("--sync-reference-steps runs in one process only (not under torchrun) yet")
    unsupported = [why for why, on in (("--reference-model", bool(model.reference_model)),
                                       ("torchrun", world_size > 1)) if on]
    if speed.reference == "precomputed" and unsupported:
        raise DpokitError(f"--reference precomputed is not supported with {unsupported[0]} yet; "
                          "use --reference live (or auto)")
    return speed.reference == "live" or bool(unsupported) or synced


def build_scorer(
    policy: torch.nn.Module,
    *,
    model: ModelConfig,
    loss: LossConfig,
    speed: SpeedConfig,
    scale: ScaleConfig,
    lora: LoraSection,
    train: TrainConfig,
    pad_id: int,
    device: torch.device,
    datasets: Sequence[Sequence[TokenizedPair]],
    needed: Sequence[Sequence[int] | None],
    output: Path,
    log: Log,
    world_size: int,
    make_live_reference: Callable[[], object],
    reference_weights: str | None = None,
    wrap: Callable[[object], object] = lambda module: module,
    memory_probe: bool = False,
) -> PairScorer:
    """The run's scorer, complete: layouts checked, reference ready (cached or precomputed, live,
    or none), policy (and a live reference) wrapped by `wrap` (`parallelize` under torchrun).

    Call it while `policy` still holds the initial weights (before any training step or
    checkpoint restore): a cache miss computes the reference log-probs with `policy` itself
    (under LoRA the adapters start at zero, so that is the base model). `make_live_reference`
    builds the live reference only when one is used. `datasets` are every set of pairs the run
    will score (train, eval); `needed[k]`, the indices of dataset k the run will use (None: all),
    limits the precomputed pass to those. `reference_weights` is the reference's weights
    fingerprint when the caller has it already (`run_reference_weights`). `memory_probe`: the run's
    path without its set-up work, for a `--memory-budget` probe (train/memory_probe.py).
    """
    router = router_loss_for(policy, loss.router_aux_loss_coef, log)  # a refusal before any work
    used = [p for pairs, wanted in zip(datasets, needed, strict=True)
            for p in (pairs if wanted is None else [pairs[i] for i in wanted])]
    _apply_malloc_setting(scale, used, device, log)
    # Every batch the run scores (training, evaluations, the reference pass) holds <= batch-size pairs.
    setup = ForwardSetup(speed, mask_cells=run_mask_cells(used, train.batch_size, speed), log=log,
                         offload=_offload_asked(scale, device))
    forwards = {"policy": setup(policy)}
    compile_if_asked(policy, speed)
    live = needs_reference(loss) and uses_live_reference(model, speed, world_size,
                                                         synced=loss.sync_reference_steps > 0)
    reference = _live_reference(policy, make_live_reference, forwards, setup, model=model, loss=loss) if live else None
    unwrapped = PairScorer(policy, reference, loss=loss, speed=speed, dtype=model.dtype, pad_id=pad_id, device=device,
                           forwards=forwards, router=router)
    # Before the reference pass in the same layout: one not exact here falls back (under auto) first.
    _settle_and_check(unwrapped, datasets[0], needed[0], train=train, world_size=world_size, output=output, log=log,
                      check_reference=bool(model.reference_model), check=not memory_probe)
    if needs_reference(loss) and not live and memory_probe:
        reference = zero_reference(datasets[0])
    elif needs_reference(loss) and not live:  # keyed on --ld-alpha too (scorer.ld_alpha)
        folder = Path(speed.reference_cache) if speed.reference_cache else output / "reference-cache"
        reference = _precomputed(unwrapped, reference_weights or run_reference_weights(model.model, None, policy),
                                 model.dtype, lora.load_in_4bit, datasets, needed, folder, train.batch_size, log)
    policy = wrap(policy)  # the policy first: a live LoRA reference wraps the same module
    return PairScorer(policy, wrap(reference) if live else reference, loss=loss, speed=speed, dtype=model.dtype,
                      pad_id=pad_id, device=device, layouts=unwrapped.layouts, chunked_head=unwrapped.chunked_head,
                      forwards=forwards, router=router)


def _apply_malloc_setting(scale: ScaleConfig, used: Sequence[TokenizedPair], device: torch.device, log: Log) -> None:
    """--malloc-mmap-threshold for the process: auto looks at the longest pair the run scores and
    at whether it checkpoints (model/host_memory.py)."""
    apply_mmap_setting(scale.malloc_mmap_threshold, max((_longest(p) for p in used), default=0), device.type, log,
                       checkpointing=scale.gradient_checkpointing)


def _settle_and_check(scorer: PairScorer, pairs: Sequence[TokenizedPair], needed: Sequence[int] | None, *,
                      train: TrainConfig, world_size: int, output: Path, log: Log, check_reference: bool,
                      check: bool = True) -> None:
    """Fix the run's layout on its first epoch's batches and run the first-batch check on the first
    (one process; `check` False: settle only); under torchrun the run takes padded rows and the model's
    own head (the math path)."""
    if world_size > 1:
        _torchrun_layouts(scorer)
        return
    batches = first_epoch_batches(pairs, needed, train.seed, train.batch_size)
    scorer.settle_layout(batches)
    if check:
        check_first_batch(scorer, batches[0] if batches else [], output, log, check_reference=check_reference)


def zero_reference(pairs: Sequence[TokenizedPair]) -> PrecomputedReference:
    """A precomputed reference of zeros for `pairs`: a memory probe's, which measures the run's
    lookups, not its reference pass (the values move no memory and no time)."""
    reference = PrecomputedReference()
    reference.add(pairs, torch.zeros(len(pairs)), torch.zeros(len(pairs)))
    return reference


def _live_reference(policy, make_live_reference: Callable[[], object], forwards: dict[str, ModelForward],
                    setup: ForwardSetup, *, model: ModelConfig, loss: LossConfig):
    """The live reference, with its entry in `forwards`: a copy of the policy (or its LoRA base)
    runs as the policy does; another model (`--reference-model`) is set up and probed itself."""
    reference = make_live_reference()
    if loss.sync_reference_steps:
        check_sync_compatible(reference, policy)
    forwards["reference"] = setup(reference) if model.reference_model else forwards["policy"]
    return reference


def guarded_scorer(policy, reference, pairs: Sequence[TokenizedPair], *, batch_size: int, loss: LossConfig,
                   speed: SpeedConfig, dtype: str, pad_id: int, device: torch.device, log: Log) -> PairScorer:
    """A scorer for `pairs` in batches of `batch_size` outside training (`dpokit evaluate`): both
    models set up for those batches as training sets them up, then checked on the first batch
    (falling back under auto, stopping for an explicit choice, as in training)."""
    setup = ForwardSetup(speed, mask_cells=run_mask_cells(pairs, batch_size, speed), log=log)
    forwards = {"policy": setup(policy), **({"reference": setup(reference)} if reference is not None else {})}
    scorer = PairScorer(policy, reference, loss=loss, speed=speed, dtype=dtype, pad_id=pad_id, device=device,
                        forwards=forwards)
    scorer.settle_layout([pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)])
    check_first_batch(scorer, list(pairs[:batch_size]), None, log, check_reference=True)
    return scorer


def first_epoch_batches(pairs: Sequence[TokenizedPair], wanted: Sequence[int] | None, seed: int,
                        batch_size: int) -> list[list[TokenizedPair]]:
    """The micro-batches of the run's first epoch in one process: the seeded order of the pairs the
    run uses (`wanted`; None: all), batch_size at a time, as the loop takes them."""
    keep = None if wanted is None else set(wanted)
    order = [i for i in epoch_order(len(pairs), seed, 0) if keep is None or i in keep]
    return [[pairs[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def _longest(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def run_mask_cells(pairs: Sequence[TokenizedPair], batch_size: int, speed: SpeedConfig) -> int:
    """The most [T x T] mask cells a batch of `batch_size` of `pairs` can have in a layout `speed` allows."""
    return max((most_mask_cells(pairs, batch_size, lay, speed.pack_length) for lay in packed_candidates(speed)),
               default=0)


@dataclass(frozen=True)
class ForwardSetup:
    """Sets up each model a run scores (`capability.configure_forward`): one attention choice for
    every batch of the run, from the most mask cells any of them can have."""

    speed: SpeedConfig
    mask_cells: int
    log: Log
    offload: bool = False

    def __call__(self, module) -> ModelForward:
        # Under --compile, auto keeps the masks: the runs differ per batch, and each would recompile.
        choice = "masks" if self.speed.compile and self.speed.attention == "auto" else self.speed.attention
        try:
            return configure_forward(module, choice=choice, layouts=packed_candidates(self.speed),
                                     mask_cells=self.mask_cells, offload=self.offload, log=self.log)
        except ValueError as exc:
            raise DpokitError(str(exc)) from None


def _offload_asked(scale: ScaleConfig, device: torch.device) -> bool:
    """--activation-offload: the forward's saved activations go to pinned CPU memory (CUDA only; a CPU
    run keeps them in CPU memory anyway, so asking for it there is an error)."""
    if scale.activation_offload and device.type != "cuda":
        raise DpokitError("--activation-offload moves activations from GPU to CPU memory; "
                          f"this run is on {device.type}, where they are in CPU memory already")
    return scale.activation_offload


def _torchrun_layouts(scorer: PairScorer) -> None:
    """Under torchrun the policy is wrapped (DDP, FSDP2), and only its full forward runs the
    wrapper's hooks (gradient sync, unsharding): padded batches and the model's own LM head.
    Packed layouts and the chunked head under torchrun are not done yet."""
    if scorer.speed.layout not in ("auto", "padded") or scorer.speed.lm_head == "chunked":
        raise DpokitError("under torchrun only --layout padded and --lm-head plain are supported yet "
                          "(auto picks them)")
    scorer.layouts, scorer.chunked_head = ["padded"], False


def _precomputed(scorer: PairScorer, weights: str, dtype: str, load_in_4bit: bool, datasets, needed, folder: Path,
                 batch_size: int, log) -> PrecomputedReference:
    """Reference log-probs of `scorer`'s policy at its initial weights, from the cache or computed now."""
    policy = scorer.policy
    fingerprint = reference_fingerprint(weights, dtype, load_in_4bit=load_in_4bit,
                                        attention=getattr(getattr(policy, "config", None), "_attn_implementation", None),
                                        ld_alpha=scorer.ld_alpha)
    was_training = policy.training
    policy.eval()
    try:
        return precompute_reference(scorer.no_grad_logps, datasets, fingerprint, folder, batch_size, log, needed)
    finally:
        policy.train(was_training)
