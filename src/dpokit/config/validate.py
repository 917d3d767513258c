"""Fail fast, before any model is loaded, on settings that cannot work (one-line errors).

Everything here reads only the config and the allowed values of `choices`: which losses exist,
what each needs and which options change it. The loss functions themselves are above (losses.py).
"""

from __future__ import annotations

import math

from dpokit.config.choices import (
    F_DIVERGENCES,
    LOSS_KINDS,
    NEEDS_LABEL_SMOOTHING,
    PER_TOKEN_LOSSES,
    SORTS_PAIRS,
    TRACKERS,
    LossKind,
    losses_where,
)
from dpokit.config.fields import flag_of, kind_of
from dpokit.config.parsers import (
    parse_columns,
    parse_memory_budget,
    parse_mmap_threshold,
    parse_template_kwargs,
)
from dpokit.config.sections import DataConfig, LossConfig, RunConfig, ScaleConfig, iter_options
from dpokit.errors import DpokitError


def validate(config: RunConfig) -> None:
    """Fail fast, before any model is loaded, on settings that cannot work."""
    m, d, lo, t = config.model, config.data, config.loss, config.train
    _check_choices_and_lists(config)
    required = [("--model", m.model), ("--data", d.data), ("--output", t.output)]
    missing = [flag for flag, value in required if not value]
    if missing:
        raise DpokitError(f"missing required option(s): {', '.join(missing)}")
    positive = {
        "--beta": lo.beta,
        "--learning-rate": t.learning_rate,
        "--batch-size": t.batch_size,
        "--gradient-accumulation-steps": t.gradient_accumulation_steps,
        "--log-every": t.log_every,
        "--epochs": t.epochs,
    }
    for flag, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise DpokitError(f"{flag} must be a positive number; got {value}")
    _check_learning_rate(t.learning_rate, t.allow_large_learning_rate)
    validate_data(d)
    for flag, value in {
        "--max-steps": t.max_steps,
        "--eval-every": t.eval_every,
        "--max-grad-norm": t.max_grad_norm,
        "--save-every": t.save_every,
    }.items():
        if value is not None and not value > 0:
            raise DpokitError(f"{flag} must be positive (or none); got {value}")
    for flag, value in {"--pack-length": config.speed.pack_length, "--lm-head-chunk": config.speed.lm_head_chunk}.items():
        if value < 0:
            raise DpokitError(f"{flag} must be >= 0 (0: automatic); got {value}")
    _check_recompute(config.scale, compiled=config.speed.compile)
    parse_mmap_threshold(config.scale.malloc_mmap_threshold)
    parse_memory_budget(config.scale.memory_budget)
    check_loss_config(lo)  # every loss option, --label-smoothing's range included
    check_report_to(t.report_to)
    if t.warmup_steps < 0 or not 0.0 <= t.warmup_ratio < 1.0:
        raise DpokitError("--warmup-steps must be >= 0 and --warmup-ratio in [0, 1)")
    if t.keep_checkpoints < 1:
        raise DpokitError(f"--keep-checkpoints must be at least 1; got {t.keep_checkpoints}")
    if t.weight_decay < 0:
        raise DpokitError(f"--weight-decay must be >= 0; got {t.weight_decay}")
    for flag, value in {"--adam-beta1": t.adam_beta1, "--adam-beta2": t.adam_beta2}.items():
        if not 0.0 <= value < 1.0:
            raise DpokitError(f"{flag} must be in [0, 1); got {value}")
    _validate_lora(config)
    _check_reference_sync(config)


def _check_recompute(scale: ScaleConfig, *, compiled: bool) -> None:
    if scale.selective_recompute and compiled:
        # torch 2.13's dynamo fails in the first backward on the selective-checkpoint policy
        # ("invalid python storage"), a raw traceback after set-up; refused before anything loads.
        raise DpokitError("--selective-recompute does not run under --compile (torch.compile fails on its saved-tensor "
                          "policy): choose one, or --gradient-checkpointing with --compile")
    if scale.selective_recompute and scale.gradient_checkpointing:
        raise DpokitError("--selective-recompute and --gradient-checkpointing are two ways to recompute activations: "
                          "choose one (checkpointing saves more memory, selective recompute less time)")
    if scale.selective_recompute and scale.parallel == "fsdp":
        raise DpokitError("--selective-recompute is not checked under --parallel fsdp; use --gradient-checkpointing "
                          "or --parallel ddp")


def _check_learning_rate(learning_rate: float, allowed: bool) -> None:
    """AdamW moves every weight by about the learning rate at each step: above 1 it wipes out any
    trained model in one step, and the run still "succeeds". Such a value is a typo of a sign (1e6
    for 1e-6) far more often than a choice, so it is refused unless insisted on."""
    if learning_rate <= 1 or allowed:
        return
    mantissa, exponent = f"{learning_rate:e}".split("e")
    guess = f"; did you mean {float(mantissa):g}e-{int(exponent):02d}?" if int(exponent) > 0 else ""
    raise DpokitError(f"--learning-rate {learning_rate:g} is above 1, which wrecks the model in one AdamW step"
                      f"{guess} (pass --allow-large-learning-rate to use it as given)")


def _check_reference_sync(config: RunConfig) -> None:
    """TR-DPO changes the reference weights during training: only a live frozen copy can follow.
    (torchrun is refused where the world size is known: `scoring.uses_live_reference`.)"""
    if not config.loss.sync_reference_steps:
        return
    if config.speed.reference == "precomputed":
        raise DpokitError("--reference precomputed cannot follow --sync-reference-steps: the cached log-probs are "
                          "the initial reference's, and TR-DPO updates it; use --reference live (auto picks it)")
    if config.lora.lora_r:
        raise DpokitError("--sync-reference-steps does not work with LoRA (--lora-r): the reference is the "
                          "policy's own base weights with the adapters off, which TR-DPO would overwrite; "
                          "train all weights (--lora-r 0) or keep the reference fixed")


def _check_choices_and_lists(config: RunConfig) -> None:
    """Each option with `choices` holds one of them; each list option holds a tuple (a value
    assigned after construction skips the conversion, and a str would read as single letters)."""
    for section, f in iter_options():
        value = getattr(getattr(config, section), f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise DpokitError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")
        if kind_of(f).is_list and value is not None and not isinstance(value, tuple):
            raise DpokitError(f"{flag_of(f)}: expected a list, got {value!r}")


def _validate_lora(config: RunConfig) -> None:
    lo = config.lora
    if lo.lora_r < 0:
        raise DpokitError(f"--lora-r must be >= 0 (0: no LoRA); got {lo.lora_r}")
    if lo.lora_r and not (lo.lora_alpha > 0 and math.isfinite(lo.lora_alpha)):
        raise DpokitError(f"--lora-alpha must be a positive number; got {lo.lora_alpha}")
    if not 0.0 <= lo.lora_dropout < 1.0:
        raise DpokitError(f"--lora-dropout must be in [0, 1); got {lo.lora_dropout}")
    if lo.lora_r and not lo.lora_target_modules:
        raise DpokitError("--lora-target-modules is empty; use all-linear or names such as q_proj,v_proj")
    if lo.load_in_4bit and not lo.lora_r:
        raise DpokitError("--load-in-4bit needs --lora-r > 0: 4-bit base weights cannot be trained, only adapters")
    if config.scale.fsdp_cpu_offload and config.scale.parallel != "fsdp":
        raise DpokitError("--fsdp-cpu-offload applies to --parallel fsdp only")
    if lo.load_in_4bit and config.scale.parallel == "fsdp":
        raise DpokitError("--load-in-4bit works with --parallel ddp only (FSDP2 cannot shard 4-bit weights here)")


def validate_data(d: DataConfig) -> None:
    """The data section alone (shared by `train` and `data inspect`)."""
    if not d.max_length > 0:
        raise DpokitError(f"--max-length must be a positive number; got {d.max_length}")
    if d.max_prompt_length is not None and not d.max_prompt_length > 0:
        raise DpokitError(f"--max-prompt-length must be positive (or none); got {d.max_prompt_length}")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
        raise DpokitError(
            f"--max-prompt-length ({d.max_prompt_length}) must be below --max-length ({d.max_length})"
        )
    if not 0.0 <= d.min_response_share < 1.0:
        raise DpokitError(f"--min-response-share must be in [0, 1); got {d.min_response_share}")
    parse_columns(d.columns)
    parse_template_kwargs(d.chat_template_kwargs)


def loss_kind(name: str) -> LossKind:
    """Look a loss up by name, with a one-line error listing the known names."""
    try:
        return LOSS_KINDS[name]
    except KeyError:
        raise DpokitError(f"--loss: unknown loss '{name}'; choose from: {', '.join(sorted(LOSS_KINDS))}") from None


def loss_weights(lo: LossConfig) -> tuple[float, ...]:
    """One weight per configured loss (1 each when --loss-weights is unset)."""
    return (1.0,) * len(lo.loss) if lo.loss_weights is None else lo.loss_weights


def check_loss_config(lo: LossConfig) -> None:
    """Reject a loss configuration that cannot work: names, weights and every loss option."""
    names = lo.loss
    if not names:
        raise DpokitError("--loss: name at least one loss")
    kinds = [loss_kind(name) for name in names]
    if len(set(names)) != len(names):
        raise DpokitError(f"--loss names a loss twice: {','.join(names)}")
    stateful = [name for name, kind in zip(names, kinds, strict=True) if kind.batch_statistics]
    if stateful and len(names) > 1:
        raise DpokitError(f"--loss {stateful[0]} keeps statistics over its own batches and cannot be combined "
                          f"with other losses; got --loss {','.join(names)}")
    weights = loss_weights(lo)
    if len(weights) != len(names):
        raise DpokitError(
            f"--loss-weights has {len(weights)} weight(s) but --loss names {len(names)} loss(es): {','.join(names)}"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise DpokitError(f"--loss-weights must be finite, >= 0 and not all 0; got {list(weights)}")
    if not (lo.beta > 0 and math.isfinite(lo.beta)):
        raise DpokitError(f"--beta must be a positive number; got {lo.beta}")
    _check_label_smoothing(lo, kinds)
    _check_f_divergence(lo, kinds)
    checks = {
        "--alpha-divergence-coef": (lo.alpha_divergence_coef, "a positive number", lambda v: v > 0),
        "--discopop-tau": (lo.discopop_tau, "a positive number", lambda v: v > 0),
        "--simpo-gamma": (lo.simpo_gamma, "a number >= 0", lambda v: v >= 0),
        "--orpo-lambda": (lo.orpo_lambda, "a number >= 0", lambda v: v >= 0),
        "--rdpo-alpha": (lo.rdpo_alpha, "a number >= 0", lambda v: v >= 0),
        "--dpop-lambda": (lo.dpop_lambda, "a number >= 0", lambda v: v >= 0),
        "--beta-dpo-alpha": (lo.beta_dpo_alpha, "a number >= 0", lambda v: v >= 0),
        "--beta-dpo-rho": (lo.beta_dpo_rho, "a fraction in (0, 1]", lambda v: 0 < v <= 1),
        "--sync-reference-steps": (lo.sync_reference_steps, "a whole number >= 0 (0: a fixed reference)",
                                   lambda v: v >= 0),
        "--sync-reference-alpha": (lo.sync_reference_alpha, "a number in (0, 1]", lambda v: 0 < v <= 1),
    }
    for flag, (value, what, ok) in checks.items():
        if not (math.isfinite(value) and ok(value)):
            raise DpokitError(f"{flag} must be {what}; got {value}")
    coef = lo.router_aux_loss_coef
    if coef is not None and not (math.isfinite(coef) and coef >= 0):
        raise DpokitError(f"--router-aux-loss-coef must be a number >= 0 (0: off; unset: the model's own); got {coef}")
    if lo.sync_reference_steps and not any(kind.needs_reference for kind in kinds):
        raise DpokitError(f"--sync-reference-steps moves the reference toward the policy, but --loss {lo.loss_spec} "
                          "uses no reference; set it to 0 or use a loss with one")
    _check_reduction_options(lo)


def _check_reduction_options(lo: LossConfig) -> None:
    """--wpo and --ld-alpha change the log-prob reduction every loss reads: refuse the losses they cannot serve."""
    sorting = [name for name in lo.loss if name in SORTS_PAIRS]
    if lo.wpo and sorting:
        raise DpokitError(f"--wpo weights each pair's loss, but --loss {sorting[0]} sorts the batch's log-ratios, "
                          "so its terms belong to no one pair; drop --wpo or use another loss")
    if lo.ld_alpha is None:
        return
    if not (math.isfinite(lo.ld_alpha) and 0.0 <= lo.ld_alpha <= 1.0):
        raise DpokitError(f"--ld-alpha must be in [0, 1] (1 is plain DPO; none: off); got {lo.ld_alpha}")
    per_token = [name for name in lo.loss if name in PER_TOKEN_LOSSES]
    if per_token:
        raise DpokitError(f"--ld-alpha desensitises summed log-probs to length, but --loss {per_token[0]} averages "
                          "them per token already; drop --ld-alpha or use a loss on summed log-probs")


def _check_label_smoothing(lo: LossConfig, kinds: list[LossKind]) -> None:
    eps = lo.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise DpokitError(f"--label-smoothing must be in [0, 0.5); got {eps}")
    if eps > 0 and not any(kind.uses_label_smoothing for kind in kinds):
        users = ", ".join(sorted(losses_where("uses_label_smoothing")))
        raise DpokitError(f"--label-smoothing {eps} has no effect on --loss {lo.loss_spec}; it applies to: {users}")
    for name in NEEDS_LABEL_SMOOTHING:
        if name in lo.loss and eps <= 0:
            raise DpokitError(f"--loss {name} needs --label-smoothing in (0, 0.5), e.g. 1e-3; got 0")


def _check_f_divergence(lo: LossConfig, kinds: list[LossKind]) -> None:
    f = lo.f_divergence
    if f not in F_DIVERGENCES:
        raise DpokitError(f"--f-divergence must be one of {', '.join(F_DIVERGENCES)}; got {f!r}")
    if f != "reverse_kl":
        bad = [name for name, kind in zip(lo.loss, kinds, strict=True) if not kind.f_divergence]
        if bad:
            ok = ", ".join(sorted(losses_where("f_divergence")))
            raise DpokitError(f"--f-divergence {f} does not apply to --loss {','.join(bad)}; it applies to: {ok}")


def check_report_to(names: tuple[str, ...]) -> None:
    """--report-to: none alone, or known trackers, each once."""
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise DpokitError(f"--report-to: unknown tracker {', '.join(unknown)}; choose none or from {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise DpokitError(f"--report-to: none cannot be combined with trackers; got {','.join(names)}")
    if len(set(names)) != len(names):
        raise DpokitError(f"--report-to: list each tracker once; got {','.join(names)}")
