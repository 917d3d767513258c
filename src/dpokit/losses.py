"""The DPO loss family as pure functions over per-sequence log-probs, and their registry.

Every function takes (B,) tensors of *summed* response log-probs (and response token counts)
and returns per-example losses and implicit rewards. Nothing here knows about models, batches
or layouts: whatever layout produced the log-probs, the math lives here once.

Notation: lr_c = π_c − ref_c and lr_r = π_r − ref_r are the log-ratios of the chosen and
rejected responses, Δ = lr_c − lr_r, ε = label smoothing, len = response token count. The
"score" of a log-ratio is the log-ratio itself under the default reverse KL, or its transform
under `--f-divergence` (f-DPO, Wang et al. 2023, Thm. 1). Reference-based losses report the
rewards β·lr_c and β·lr_r (TRL's convention), on length-averaged log-probs for the losses
that average them (IPO, sigmoid_norm); reference-free ones report β·π/len. Nothing calls
`.item()` or branches on tensor values, so no function forces a host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.errors import DpokitError

Tensor = torch.Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Loss-specific options: name -> default. `LossConfig` carries the same names and defaults.
DEFAULT_OPTIONS: dict[str, object] = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "f_divergence": "reverse_kl",
    "alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,
    "orpo_lambda": 0.1,
    "rdpo_alpha": 0.01,
}
_TENSOR_ARGS = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)


@dataclass(frozen=True)
class LossOutput:
    """Per-example tensors, each of shape (B,).

    Rewards and log-probs are reported on what the loss sees (TRL's convention): a loss that
    length-averages its log-probs (IPO, sigmoid_norm, the reference-free ones) reports rewards
    β·lr/len and sets `chosen_logps`/`rejected_logps` to the averaged policy log-probs; None
    there means the summed ones.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor | None = None
    rejected_logps: Tensor | None = None


@dataclass(frozen=True)
class LossSpec:
    """A registry entry: the function and what it needs from the trainer."""

    fn: Callable[..., LossOutput]
    needs_reference: bool
    doc: str
    uses_label_smoothing: bool = False  # whether ε changes the loss
    f_divergence: bool = False  # whether --f-divergence other than reverse_kl is meaningful
    needs_lengths: bool = False  # whether response token counts enter the loss


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _score(logratios: Tensor, f_divergence: str, alpha_divergence_coef: float) -> Tensor:
    """f'(π/ref) of f-DPO (Wang et al. 2023, Table 1), written in log-ratios as TRL 1.16 does."""
    if f_divergence == "reverse_kl":  # f'(t) = log t + 1; the constant cancels in Δ
        return logratios
    if f_divergence == "forward_kl":  # f'(t) = 1 − 1/t: the α-divergence's f' at α = 0
        return _power_score(logratios, 0.0)
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":  # f'(t) = (t^(α−1) − 1) / (α − 1); reverse KL at α = 1
        a = alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        return _power_score(logratios, a)
    raise DpokitError(f"--f-divergence must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence!r}")


def _power_score(logratios: Tensor, a: float) -> Tensor:
    """(t^(a−1) − 1) / (a − 1) with t = exp(logratio), a ≠ 1. The exponent is clamped so exp() stays
    finite (fp16/bf16 computed in fp32, as TRL does): an extreme log-ratio (−106 nats under forward
    KL) gives a huge finite score, never inf, so the losses built on it never meet inf − inf or 0·inf."""
    work = logratios.float() if logratios.dtype in (torch.float16, torch.bfloat16) else logratios
    clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0 if work.dtype == torch.float32 else 700.0
    t = torch.clamp((a - 1.0) * work, max=clamp_max)
    return (torch.expm1(t) / (a - 1.0)).to(logratios.dtype)


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr


def _ref_rewards(beta: float, lr_c: Tensor, lr_r: Tensor) -> tuple[Tensor, Tensor]:
    return beta * lr_c.detach(), beta * lr_r.detach()


def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-averaged log-prob; counts below 1 count as 1 (an empty response has log-prob 0)."""
    return logps / lengths.clamp(min=1.0)


def _averaged_output(losses: Tensor, beta: float, lr_c: Tensor, lr_r: Tensor, pc: Tensor, pr: Tensor,
                     len_c: Tensor, len_r: Tensor) -> LossOutput:
    """Rewards β·lr/len and log-probs π/len: the length-averaged quantities such a loss sees."""
    return LossOutput(losses, *_ref_rewards(beta, _avg(lr_c, len_c), _avg(lr_r, len_r)),
                      _avg(pc, len_c).detach(), _avg(pr, len_r).detach())


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with ε of the labels flipped."""
    if eps == 0:  # not 0 · log σ(−z), which is NaN where log σ(−z) is −inf
        return F.softplus(-z)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _margin(o: dict, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(βΔ on scores, lr_c, lr_r) for the losses that take --f-divergence."""
    lr_c, lr_r = _logratios(pc, pr, rc, rr)
    f, a = o.get("f_divergence", "reverse_kl"), o.get("alpha_divergence_coef", 0.5)
    return o["beta"] * (_score(lr_c, f, a) - _score(lr_r, f, a)), lr_c, lr_r


# ---------------------------------------------------------------------------------------------
# The losses. Each has the same keyword signature: the six (B,) tensors plus options.


def _sigmoid(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """DPO, Rafailov et al. 2023, eq. 7: −log σ(βΔ); ε > 0 gives conservative DPO (cDPO, Mitchell 2023)."""
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return LossOutput(_smoothed_logistic(z, o.get("label_smoothing", 0.0)), *_ref_rewards(o["beta"], lr_c, lr_r))


def _robust(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """rDPO, Chowdhury et al. 2024, eq. 8: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)."""
    eps = o.get("label_smoothing", 0.0)
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _hinge(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """SLiC-HF, Zhao et al. 2023, eq. 1 (calibration hinge, margin 1 on βΔ): relu(1 − βΔ)."""
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return LossOutput(torch.relu(1 - z), *_ref_rewards(o["beta"], lr_c, lr_r))


def _ipo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
         chosen_lengths, rejected_lengths, **o):
    """IPO, Azar et al. 2023, eq. 17 on length-averaged scores: (lr_c/len_c − lr_r/len_r − 1/(2β))²."""
    beta, f, a = o["beta"], o.get("f_divergence", "reverse_kl"), o.get("alpha_divergence_coef", 0.5)
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    gap = _avg(_score(lr_c, f, a), chosen_lengths) - _avg(_score(lr_r, f, a), rejected_lengths)
    return _averaged_output((gap - 1 / (2 * beta)) ** 2, beta, lr_c, lr_r, policy_chosen_logps, policy_rejected_logps,
                            chosen_lengths, rejected_lengths)


def _exo_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """EXO-pref, Ji et al. 2024, eq. 16, as defined in TRL 1.16 DPOTrainer: KL(σ(±βΔ) ‖ (1−ε, ε)); needs ε > 0."""
    eps = o.get("label_smoothing", 0.0)
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = torch.exp(log_qw) * (log_qw - math.log1p(-eps)) + torch.exp(log_ql) * (log_ql - math.log(eps))
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _nca_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """NCA, Chen et al. 2024, eq. 9 (K=2), as defined in TRL 1.16 DPOTrainer: −log σ(βlr_c) − ½log σ(−βlr_c) − ½log σ(−βlr_r)."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    rc, rr = o["beta"] * lr_c, o["beta"] * lr_r
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _bco_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """BCO, Jung et al. 2024, eq. 7 without the running shift δ, as defined in TRL 1.16 DPOTrainer: −log σ(βlr_c) − log σ(−βlr_r)."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(o["beta"] * lr_c) - F.logsigmoid(-o["beta"] * lr_r)
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _sppo_hard(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """SPPO, Wu et al. 2024, eq. 4.7 with hard win probabilities (1, 0), as defined in TRL 1.16 DPOTrainer: (lr_c − 1/(2β))² + (lr_r + 1/(2β))²."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    half = 0.5 / o["beta"]
    return LossOutput((lr_c - half) ** 2 + (lr_r + half) ** 2, *_ref_rewards(o["beta"], lr_c, lr_r))


def _aot(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """AOT (paired), Melnyk et al. 2024, eq. 11, as defined in TRL 1.16 DPOTrainer: cDPO loss on sorted(π_c − π_r) − sorted(ref_c − ref_r) over the batch."""
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    losses = _smoothed_logistic(o["beta"] * delta, o.get("label_smoothing", 0.0))
    return LossOutput(losses, *_ref_rewards(o["beta"], pc - rc, pr - rr))


def _aot_unpaired(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """AOT (unpaired), Melnyk et al. 2024, eq. 10, as defined in TRL 1.16 DPOTrainer: cDPO loss on sorted(lr_c) − sorted(lr_r) over the batch."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    delta = torch.sort(lr_c, dim=0).values - torch.sort(lr_r, dim=0).values
    losses = _smoothed_logistic(o["beta"] * delta, o.get("label_smoothing", 0.0))
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _apo_zero(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7, as defined in TRL 1.16 DPOTrainer: 1 − σ(βlr_c) + σ(βlr_r)."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = 1 - torch.sigmoid(o["beta"] * lr_c) + torch.sigmoid(o["beta"] * lr_r)
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _apo_down(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """APO-down, D'Oosterlinck et al. 2024, eq. 8, as defined in TRL 1.16 DPOTrainer: σ(βlr_c) + 1 − σ(βΔ)."""
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = torch.sigmoid(o["beta"] * lr_c) + 1 - torch.sigmoid(o["beta"] * (lr_c - lr_r))
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _discopop(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **o):
    """DiscoPOP (LRML), Chris Lu et al. 2024, eq. 5, as defined in TRL 1.16 DPOTrainer: (1−m)·(−log σ(βΔ)) + m·e^(−βΔ), m = σ(βΔ/τ)."""
    tau = o.get("discopop_tau", 0.05)
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    # Same value as the formula above, but m·e^(−z) is taken as exp(log m − z), which stays finite for very negative z.
    losses = F.softplus(-z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _sigmoid_norm(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  chosen_lengths, rejected_lengths, **o):
    """Length-normalised DPO (Meng et al. 2024, SimPO §2 ablation), as defined in TRL 1.16 DPOTrainer: −log σ(β(lr_c/len_c − lr_r/len_r))."""
    beta, f, a = o["beta"], o.get("f_divergence", "reverse_kl"), o.get("alpha_divergence_coef", 0.5)
    lr_c, lr_r = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    gap = _avg(_score(lr_c, f, a), chosen_lengths) - _avg(_score(lr_r, f, a), rejected_lengths)
    return _averaged_output(-F.logsigmoid(beta * gap), beta, lr_c, lr_r, policy_chosen_logps, policy_rejected_logps,
                            chosen_lengths, rejected_lengths)


def _rdpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
          chosen_lengths, rejected_lengths, **o):
    """R-DPO, Park et al. 2024, eq. 9: −log σ(βΔ + α(len_c − len_r)), i.e. DPO on the length-penalised reward r − α·len."""
    z, lr_c, lr_r = _margin(o, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(z + o.get("rdpo_alpha", 0.01) * (chosen_lengths - rejected_lengths))
    return LossOutput(losses, *_ref_rewards(o["beta"], lr_c, lr_r))


def _free_rewards(o: dict, avg_c: Tensor, avg_r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rewards β·π/len and the averaged log-probs π/len that reference-free losses see."""
    return o["beta"] * avg_c.detach(), o["beta"] * avg_r.detach(), avg_c.detach(), avg_r.detach()


def _sft(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, **o):
    """NLL of the chosen response per token, −π_c/len_c, as in RPO (Pang et al. 2024, eq. 3); reference-free, rewards β·π/len."""
    avg_c, avg_r = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    return LossOutput(-avg_c, *_free_rewards(o, avg_c, avg_r))


def _simpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, **o):
    """SimPO, Meng et al. 2024, eq. 6: −log σ(β(π_c/len_c − π_r/len_r) − γ); reference-free, rewards β·π/len."""
    avg_c, avg_r = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(o["beta"] * (avg_c - avg_r) - o.get("simpo_gamma", 0.5))
    return LossOutput(losses, *_free_rewards(o, avg_c, avg_r))


def _log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) from log p ≤ 0, with log(1 − p) = log(−expm1(log p)) (exact near p = 1 and p = 0)."""
    tiny = torch.finfo(avg_logp.dtype).tiny
    x = avg_logp.clamp(max=-tiny)  # p = 1 exactly would give infinite odds
    near = x > -math.log(2)  # each branch gets only inputs where it is exact, so no NaN leaks into gradients
    log1m_near = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    log1m_far = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return x - torch.where(near, log1m_near, log1m_far)


def _orpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, **o):
    """ORPO, Hong et al. 2024, eq. 6–7: −π_c/len_c + λ·(−log σ(log-odds_c − log-odds_r)) on length-averaged log-probs; reference-free, rewards β·π/len."""
    avg_c, avg_r = _avg(policy_chosen_logps, chosen_lengths), _avg(policy_rejected_logps, rejected_lengths)
    ratio = -F.logsigmoid(_log_odds(avg_c) - _log_odds(avg_r))
    return LossOutput(-avg_c + o.get("orpo_lambda", 0.1) * ratio, *_free_rewards(o, avg_c, avg_r))


def _spec(fn, *, ref=True, eps=False, fdiv=False, lengths=False) -> LossSpec:
    return LossSpec(fn, ref, (fn.__doc__ or "").strip(), eps, fdiv, lengths)


LOSSES: dict[str, LossSpec] = {
    "sigmoid": _spec(_sigmoid, eps=True, fdiv=True),
    "robust": _spec(_robust, eps=True, fdiv=True),
    "hinge": _spec(_hinge, fdiv=True),
    "ipo": _spec(_ipo, fdiv=True, lengths=True),
    "exo_pair": _spec(_exo_pair, eps=True, fdiv=True),
    "nca_pair": _spec(_nca_pair),
    "bco_pair": _spec(_bco_pair),
    "sppo_hard": _spec(_sppo_hard),
    "aot": _spec(_aot, eps=True),
    "aot_unpaired": _spec(_aot_unpaired, eps=True),
    "apo_zero": _spec(_apo_zero),
    "apo_down": _spec(_apo_down),
    "discopop": _spec(_discopop, fdiv=True),
    "sigmoid_norm": _spec(_sigmoid_norm, fdiv=True, lengths=True),
    "rdpo": _spec(_rdpo, fdiv=True, lengths=True),
    "sft": _spec(_sft, ref=False, fdiv=True, lengths=True),  # fdiv: ignored, so it combines with any
    "simpo": _spec(_simpo, ref=False, lengths=True),
    "orpo": _spec(_orpo, ref=False, lengths=True),
}
LOSSES["dpo"] = LOSSES["sigmoid"]


# ---------------------------------------------------------------------------------------------
# Entry points


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name, with a one-line error listing the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise DpokitError(f"--loss: unknown loss '{name}'; choose from: {', '.join(sorted(LOSSES))}") from None


def preference_loss(name: str, **tensors_and_options: object) -> LossOutput:
    """Compute the named loss; see each registry entry's docstring for its equation.

    Takes the six (B,) tensors of `_TENSOR_ARGS` (reference ones may be None for reference-free
    losses, lengths may be None for losses that do not use them) and the options of
    `DEFAULT_OPTIONS`; an option left out takes its default.
    """
    spec = get_loss(name)
    unknown = set(tensors_and_options) - set(_TENSOR_ARGS) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"preference_loss() got unexpected argument(s): {', '.join(sorted(unknown))}")
    kwargs = {**DEFAULT_OPTIONS, **{k: None for k in _TENSOR_ARGS}, **tensors_and_options}
    if spec.needs_reference and (kwargs["reference_chosen_logps"] is None or kwargs["reference_rejected_logps"] is None):
        raise DpokitError(f"--loss {name} needs reference log-probs, but none were given")
    if spec.needs_lengths and (kwargs["chosen_lengths"] is None or kwargs["rejected_lengths"] is None):
        raise DpokitError(f"--loss {name} needs response lengths, but none were given")
    if kwargs["f_divergence"] != "reverse_kl" and not spec.f_divergence:
        raise DpokitError(f"--f-divergence {kwargs['f_divergence']} does not apply to --loss {name}")
    return spec.fn(**kwargs)


def loss_names(loss: str | Sequence[str]) -> list[str]:
    """The configured loss names: 'sigmoid,sft' (or a YAML list, or its string form) -> ['sigmoid', 'sft']."""
    parts = loss if isinstance(loss, (list, tuple)) else str(loss).strip("[]()").split(",")
    return [str(p).strip().strip("'\"").strip() for p in parts]


def loss_weights(loss_config) -> list[float]:
    """One weight per configured loss (1 each when --loss-weights is unset)."""
    names = loss_names(loss_config.loss)
    raw = getattr(loss_config, "loss_weights", None)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        return [1.0] * len(names)
    parts = raw if isinstance(raw, (list, tuple)) else str(raw).strip("[]()").split(",")
    try:
        weights = [float(str(p).strip().strip("'\"")) for p in parts]
    except ValueError:
        raise DpokitError(f"--loss-weights must be comma-separated numbers; got {raw!r}") from None
    if len(weights) != len(names):
        raise DpokitError(
            f"--loss-weights has {len(weights)} weight(s) but --loss names {len(names)} loss(es): {','.join(names)}"
        )
    return weights


def _options(loss_config) -> dict[str, object]:
    return {name: getattr(loss_config, name, default) for name, default in DEFAULT_OPTIONS.items()}


def needs_reference(loss_config) -> bool:
    """Whether any loss in the run's configuration needs reference log-probs."""
    return any(get_loss(name).needs_reference for name in loss_names(loss_config.loss))


def check_loss_config(loss_config) -> None:
    """Reject, before any model is loaded, a loss configuration that cannot work (one-line errors)."""
    names = loss_names(loss_config.loss)
    if not all(names):
        raise DpokitError(f"--loss: empty loss name in {loss_config.loss!r}")
    specs = [get_loss(name) for name in names]
    if len(set(names)) != len(names):
        raise DpokitError(f"--loss names a loss twice: {','.join(names)}")
    weights = loss_weights(loss_config)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise DpokitError(f"--loss-weights must be finite, >= 0 and not all 0; got {weights}")
    o = _options(loss_config)
    if not (isinstance(o["beta"], (int, float)) and o["beta"] > 0 and math.isfinite(o["beta"])):
        raise DpokitError(f"--beta must be a positive number; got {o['beta']}")
    eps = o["label_smoothing"]
    if not 0.0 <= eps < 0.5:
        raise DpokitError(f"--label-smoothing must be in [0, 0.5); got {eps}")
    if eps > 0 and not any(s.uses_label_smoothing for s in specs):
        users = sorted({n for n, s in LOSSES.items() if s.uses_label_smoothing})
        raise DpokitError(f"--label-smoothing {eps} has no effect on --loss {','.join(names)}; it applies to: {', '.join(users)}")
    if "exo_pair" in names and eps <= 0:
        raise DpokitError("--loss exo_pair needs --label-smoothing in (0, 0.5), e.g. 1e-3; got 0")
    f = o["f_divergence"]
    if f not in F_DIVERGENCES:
        raise DpokitError(f"--f-divergence must be one of {', '.join(F_DIVERGENCES)}; got {f!r}")
    if f != "reverse_kl":
        bad = [n for n, s in zip(names, specs, strict=True) if not s.f_divergence]
        if bad:
            ok = sorted(n for n, s in LOSSES.items() if s.f_divergence)
            raise DpokitError(f"--f-divergence {f} does not apply to --loss {','.join(bad)}; it applies to: {', '.join(ok)}")
    checks = {
        "--alpha-divergence-coef": (o["alpha_divergence_coef"], "a positive number", lambda v: v > 0),
        "--discopop-tau": (o["discopop_tau"], "a positive number", lambda v: v > 0),
        "--simpo-gamma": (o["simpo_gamma"], "a number >= 0", lambda v: v >= 0),
        "--orpo-lambda": (o["orpo_lambda"], "a number >= 0", lambda v: v >= 0),
        "--rdpo-alpha": (o["rdpo_alpha"], "a number >= 0", lambda v: v >= 0),
    }
    for flag, (value, what, ok) in checks.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise DpokitError(f"{flag} must be {what}; got {value}")


def loss_from_config(
    loss_config,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> LossOutput:
    """The run's loss (a `LossConfig`) on one batch: the weighted sum of the configured losses.

    Rewards are those of the first reference-based loss configured, else of the first loss.
    """
    tensors = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    names, weights, options = loss_names(loss_config.loss), loss_weights(loss_config), _options(loss_config)
    outputs = [preference_loss(name, **tensors, **options) for name in names]
    total = sum((out.losses * w for out, w in zip(outputs[1:], weights[1:], strict=True)), outputs[0].losses * weights[0])
    with_ref = [out for name, out in zip(names, outputs, strict=True) if LOSSES[name].needs_reference]
    rewards = (with_ref or outputs)[0]
    return LossOutput(total, rewards.chosen_rewards, rewards.rejected_rewards, rewards.chosen_logps,
                      rewards.rejected_logps)
