"""The DPO loss family as pure functions over per-sequence log-probs, and their registry.

Every loss reads (B,) tensors of *summed* response log-probs (and response token counts) through
one `PairLogRatios` (dpokit.logratios), which computes the shared quantities once per batch, as
the DPO paper's reference code does, and returns per-example losses and implicit rewards. Nothing here knows
about models, batches or layouts: whatever layout produced the log-probs, the math lives here once.
`compile_loss` turns a run's `LossConfig` into a `LossPlan` once per run (names, weights, frozen
options); the trainer calls the plan per micro-batch.

Notation: lr_c = π_c − ref_c and lr_r = π_r − ref_r are the log-ratios of the chosen and
rejected responses, Δ = lr_c − lr_r, ε = label smoothing, len = response token count. The
"score" of a log-ratio is the log-ratio itself under the default reverse KL, or its transform
under `--f-divergence` (f-DPO, Wang et al. 2023, Thm. 1); `logits` is Δ on scores. Reference-
based losses report the rewards β·lr_c and β·lr_r on the summed log-ratios (TRL 1.16's, for every
loss: IPO and sigmoid_norm too, whose per-token margin goes in `margins_per_token`); reference-free
ones report β·π/len. Nothing calls `.item()` or branches on tensor values, so no function forces a host sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.config import (
    F_DIVERGENCES,
    LOSS_KINDS,
    LossConfig,
    LossKind,
    check_loss_config,
    loss_kind,
    loss_weights,
)
from dpokit.errors import DpokitError
from dpokit.logratios import LossOptions, LossOutput, PairLogRatios, RunningMargin

__all__ = ["F_DIVERGENCES", "LOSSES", "LossOptions", "LossOutput", "LossPlan", "LossSpec", "PairLogRatios",
           "check_loss_config", "compile_loss", "get_loss", "loss_from_config", "needs_reference", "preference_loss"]

Tensor = torch.Tensor

_TENSOR_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
                "chosen_lengths", "rejected_lengths")

_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))
_DEFAULT_OPTIONS = LossOptions.from_config(LossConfig())


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with ε of the labels flipped."""
    if eps == 0:  # not 0 · log σ(−z), which is NaN where log σ(−z) is −inf
        return F.softplus(-z)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) from log p ≤ 0, with log(1 − p) = log(−expm1(log p)) (exact near p = 1 and p = 0)."""
    tiny = torch.finfo(avg_logp.dtype).tiny
    x = avg_logp.clamp(max=-tiny)  # p = 1 exactly would give infinite odds
    near = x > -math.log(2)  # each branch gets only inputs where it is exact, so no NaN leaks into gradients
    log1m_near = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    log1m_far = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return x - torch.where(near, log1m_near, log1m_far)


# ---------------------------------------------------------------------------------------------
# The losses. Each reads the batch's PairLogRatios `q` and the run's options `o`.

LossFn = Callable[[PairLogRatios, LossOptions], LossOutput]


def _sigmoid(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """DPO, Rafailov et al. 2023, eq. 7: −log σ(βΔ); ε > 0 gives conservative DPO (cDPO, Mitchell 2023)."""
    return LossOutput(_smoothed_logistic(o.beta * q.logits, o.label_smoothing), *q.rewards)


def _robust(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """rDPO, Chowdhury et al. 2024, eq. 8: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)."""
    z, eps = o.beta * q.logits, o.label_smoothing
    return LossOutput((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), *q.rewards)


def _hinge(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """SLiC-HF, Zhao et al. 2023, eq. 1 (calibration hinge, margin 1 on βΔ): relu(1 − βΔ)."""
    return LossOutput(torch.relu(1 - o.beta * q.logits), *q.rewards)


def _ipo(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """IPO, Azar et al. 2023, eq. 17 on length-averaged scores: (lr_c/len_c − lr_r/len_r − 1/(2β))²."""
    return q.averaged_output((q.averaged_logits - 1 / (2 * o.beta)) ** 2)


def _exo_pair(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """EXO-pref, Ji et al. 2024, eq. 16, as defined in TRL 1.16 DPOTrainer: KL(σ(±βΔ) ‖ (1−ε, ε)); needs ε > 0."""
    z, eps = o.beta * q.logits, o.label_smoothing
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = torch.exp(log_qw) * (log_qw - math.log1p(-eps)) + torch.exp(log_ql) * (log_ql - math.log(eps))
    return LossOutput(losses, *q.rewards)


def _nca_pair(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """NCA, Chen et al. 2024, eq. 9 (K=2), as defined in TRL 1.16 DPOTrainer: −log σ(βlr_c) − ½log σ(−βlr_c) − ½log σ(−βlr_r)."""
    rc, rr = o.beta * q.chosen_logratios, o.beta * q.rejected_logratios
    return LossOutput(-F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr), *q.rewards)


def _bco_pair(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """BCO, Jung et al. 2024, eq. 7 without the running shift δ, as defined in TRL 1.16 DPOTrainer: −log σ(βlr_c) − log σ(−βlr_r)."""
    losses = -F.logsigmoid(o.beta * q.chosen_logratios) - F.logsigmoid(-o.beta * q.rejected_logratios)
    return LossOutput(losses, *q.rewards)


def _sppo_hard(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """SPPO, Wu et al. 2024, eq. 4.7 with hard win probabilities (1, 0), as defined in TRL 1.16 DPOTrainer: (lr_c − 1/(2β))² + (lr_r + 1/(2β))²."""
    half = 0.5 / o.beta
    return LossOutput((q.chosen_logratios - half) ** 2 + (q.rejected_logratios + half) ** 2, *q.rewards)


def _aot(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """AOT (paired), Melnyk et al. 2024, eq. 11, as defined in TRL 1.16 DPOTrainer: cDPO loss on sorted(π_c − π_r) − sorted(ref_c − ref_r) over the batch."""
    delta = (torch.sort(q.policy_chosen_logps - q.policy_rejected_logps, dim=0).values
             - torch.sort(q.reference_chosen_logps - q.reference_rejected_logps, dim=0).values)
    return LossOutput(_smoothed_logistic(o.beta * delta, o.label_smoothing), *q.rewards)


def _aot_unpaired(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """AOT (unpaired), Melnyk et al. 2024, eq. 10, as defined in TRL 1.16 DPOTrainer: cDPO loss on sorted(lr_c) − sorted(lr_r) over the batch."""
    delta = torch.sort(q.chosen_logratios, dim=0).values - torch.sort(q.rejected_logratios, dim=0).values
    return LossOutput(_smoothed_logistic(o.beta * delta, o.label_smoothing), *q.rewards)


def _apo_zero(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7, as defined in TRL 1.16 DPOTrainer: 1 − σ(βlr_c) + σ(βlr_r)."""
    losses = 1 - torch.sigmoid(o.beta * q.chosen_logratios) + torch.sigmoid(o.beta * q.rejected_logratios)
    return LossOutput(losses, *q.rewards)


def _apo_down(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """APO-down, D'Oosterlinck et al. 2024, eq. 8, as defined in TRL 1.16 DPOTrainer: σ(βlr_c) + 1 − σ(βΔ)."""
    losses = torch.sigmoid(o.beta * q.chosen_logratios) + 1 - torch.sigmoid(o.beta * q.logits)
    return LossOutput(losses, *q.rewards)


def _discopop(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """DiscoPOP (LRML), Chris Lu et al. 2024, eq. 5, as defined in TRL 1.16 DPOTrainer: (1−m)·(−log σ(βΔ)) + m·e^(−βΔ), m = σ(βΔ/τ)."""
    z, tau = o.beta * q.logits, o.discopop_tau
    # Same value as the formula above, but m·e^(−z) is taken as exp(log m − z), which stays finite for very negative z.
    return LossOutput(F.softplus(-z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z), *q.rewards)


def _sigmoid_norm(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """Length-normalised DPO (Meng et al. 2024, SimPO §2 ablation), as defined in TRL 1.16 DPOTrainer: −log σ(β(lr_c/len_c − lr_r/len_r))."""
    return q.averaged_output(-F.logsigmoid(o.beta * q.averaged_logits))


def _rdpo(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """R-DPO, Park et al. 2024, eq. 9: −log σ(βΔ + α(len_c − len_r)), i.e. DPO on the length-penalised reward r − α·len."""
    length_gap = q.chosen_lengths - q.rejected_lengths
    return LossOutput(-F.logsigmoid(o.beta * q.logits + o.rdpo_alpha * length_gap), *q.rewards)


def _dpop(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """DPO-Positive (Smaug), Pal et al. 2024, eq. 3: −log σ(β(Δ − λ·max(0, ref_c − π_c))); λ = 0 is DPO."""
    chosen_shortfall = torch.relu(-q.chosen_logratios)  # how far π_c has fallen below ref_c, 0 above it
    return LossOutput(-F.logsigmoid(o.beta * (q.logits - o.dpop_lambda * chosen_shortfall)), *q.rewards)


def _beta_dpo(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """β-DPO, Wu et al. 2024 (arXiv:2407.08639), §4: DPO at β_batch = β·(1 + α(M̄ − M0)) on the ⌈ρB⌉ pairs whose margin M = Δ lies nearest M0."""
    # M0 is the running mean (RunningMargin, this batch folded in); M̄ the mean margin of the kept
    # pairs. The authors' code samples the kept pairs with Gaussian weights exp(−(M − M0)²/2σ²); we
    # keep the most probable ones, the same for every σ, so a run needs no random draws. Kept pairs'
    # losses are scaled by B/k so that the step's mean is the mean over the kept pairs.
    margins = q.logits.detach()
    running = q.running_margin if q.running_margin is not None else margins.mean()
    kept = max(1, math.ceil(o.beta_dpo_rho * margins.numel() - 1e-9))  # ρB up to float noise (0.8·5 = 4.000…01)
    nearest = torch.topk(-(margins - running).abs(), kept, sorted=False).indices
    mask = torch.zeros_like(margins).index_fill_(0, nearest, margins.numel() / kept)
    beta = (o.beta * (1 + o.beta_dpo_alpha * (margins[nearest].mean() - running))).clamp(min=1e-3 * o.beta)
    return LossOutput(mask * -F.logsigmoid(beta * q.logits), *q.rewards)


def _sft(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """NLL of the chosen response per token, −π_c/len_c, as in RPO (Pang et al. 2024, eq. 3); reference-free, rewards β·π/len."""
    return q.reference_free_output(-q.averaged_logps[0])


def _simpo(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """SimPO, Meng et al. 2024, eq. 6: −log σ(β(π_c/len_c − π_r/len_r) − γ); reference-free, rewards β·π/len."""
    avg_c, avg_r = q.averaged_logps
    return q.reference_free_output(-F.logsigmoid(o.beta * (avg_c - avg_r) - o.simpo_gamma))


def _orpo(q: PairLogRatios, o: LossOptions) -> LossOutput:
    """ORPO, Hong et al. 2024, eq. 6–7: −π_c/len_c + λ·(−log σ(log-odds_c − log-odds_r)) on length-averaged log-probs; reference-free, rewards β·π/len."""
    avg_c, avg_r = q.averaged_logps
    return q.reference_free_output(-avg_c + o.orpo_lambda * -F.logsigmoid(_log_odds(avg_c) - _log_odds(avg_r)))


# ---------------------------------------------------------------------------------------------
# The registry: config's loss catalogue (what each name needs) paired with the functions here.


@dataclass(frozen=True)
class LossSpec:
    """A registry entry: the function and what it needs from the trainer."""

    fn: LossFn
    needs_reference: bool
    doc: str
    uses_label_smoothing: bool = False  # whether ε changes the loss
    f_divergence: bool = False  # whether --f-divergence other than reverse_kl is meaningful
    needs_lengths: bool = False  # whether response token counts enter the loss
    batch_statistics: bool = False  # whether it reads a running statistic of the training batches (β-DPO's M0)


# name -> (function, whether it reads response lengths): one entry per name of config's LOSS_KINDS.
_FUNCTIONS: dict[str, tuple[LossFn, bool]] = {
    "sigmoid": (_sigmoid, False),
    "dpo": (_sigmoid, False),
    "robust": (_robust, False),
    "hinge": (_hinge, False),
    "ipo": (_ipo, True),
    "exo_pair": (_exo_pair, False),
    "nca_pair": (_nca_pair, False),
    "bco_pair": (_bco_pair, False),
    "sppo_hard": (_sppo_hard, False),
    "aot": (_aot, False),
    "aot_unpaired": (_aot_unpaired, False),
    "apo_zero": (_apo_zero, False),
    "apo_down": (_apo_down, False),
    "discopop": (_discopop, False),
    "sigmoid_norm": (_sigmoid_norm, True),
    "rdpo": (_rdpo, True),
    "dpop": (_dpop, False),
    "beta_dpo": (_beta_dpo, False),
    "sft": (_sft, True),
    "simpo": (_simpo, True),
    "orpo": (_orpo, True),
}


def _registry_entry(name: str, kind: LossKind) -> LossSpec:
    fn, needs_lengths = _FUNCTIONS[name]  # a catalogue name without a function fails here, at import
    return LossSpec(fn, kind.needs_reference, (fn.__doc__ or "").strip(), kind.uses_label_smoothing,
                    kind.f_divergence, needs_lengths, kind.batch_statistics)


LOSSES: dict[str, LossSpec] = {name: _registry_entry(name, kind) for name, kind in LOSS_KINDS.items()}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name, with a one-line error listing the known names."""
    loss_kind(name)
    return LOSSES[name]


def _check_inputs(name: str, spec: LossSpec, q: PairLogRatios) -> None:
    """The tensors a loss reads are there, and --f-divergence applies to it (cheap: no host sync)."""
    if spec.needs_reference and (q.reference_chosen_logps is None or q.reference_rejected_logps is None):
        raise DpokitError(f"--loss {name} needs reference log-probs, but none were given")
    if spec.needs_lengths and (q.chosen_lengths is None or q.rejected_lengths is None):
        raise DpokitError(f"--loss {name} needs response lengths, but none were given")
    if q.options.f_divergence != "reverse_kl" and not spec.f_divergence:
        raise DpokitError(f"--f-divergence {q.options.f_divergence} does not apply to --loss {name}")


def preference_loss(name: str, **tensors_and_options: object) -> LossOutput:
    """Compute the named loss; see each registry entry's docstring for its equation.

    Takes the six (B,) tensors of `_TENSOR_ARGS` (reference ones may be None for reference-free
    losses, lengths may be None for losses that do not use them) and the fields of `LossOptions`;
    an option left out takes LossConfig's default.
    """
    spec = get_loss(name)
    unknown = set(tensors_and_options) - set(_TENSOR_ARGS) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"preference_loss() got unexpected argument(s): {', '.join(sorted(unknown))}")
    options = dataclasses.replace(_DEFAULT_OPTIONS, **{k: v for k, v in tensors_and_options.items()
                                                       if k in _OPTION_NAMES})
    q = PairLogRatios(**{k: tensors_and_options.get(k) for k in _TENSOR_ARGS}, options=options)
    _check_inputs(name, spec, q)
    return spec.fn(q, options)


# ---------------------------------------------------------------------------------------------
# A run's loss, compiled once


@dataclass(frozen=True)
class LossPlan:
    """A run's loss: the weighted sum of the configured losses, with names, weights and options
    resolved once. Call it per micro-batch with the six (B,) tensors."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    specs: tuple[LossSpec, ...]
    options: LossOptions
    running_margin: RunningMargin | None = None  # the run's β-DPO statistic; None for the other losses

    @property
    def needs_reference(self) -> bool:
        return any(spec.needs_reference for spec in self.specs)

    def state_dict(self) -> dict[str, float | str]:
        """What a checkpoint must keep for the loss to continue exactly (empty for stateless losses)."""
        return self.running_margin.state_dict() if self.running_margin is not None else {}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        if self.running_margin is not None:
            self.running_margin.load_state_dict(state)

    def __call__(self, *, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                 reference_chosen_logps: Tensor | None, reference_rejected_logps: Tensor | None,
                 chosen_lengths: Tensor, rejected_lengths: Tensor, pair_weights: Tensor | None = None) -> LossOutput:
        """Rewards are those of the first reference-based loss configured, else of the first loss;
        the per-token margin that of the first length-averaging loss.

        `pair_weights` (B,), WPO's w_c·w_r (`model.logprobs.wpo_pair_weights`, no gradient), scale
        each pair's total loss, every configured term alike (as TRL 1.16's use_weighting); the
        rewards stay unweighted."""
        q = PairLogRatios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                          reference_rejected_logps, chosen_lengths, rejected_lengths, self.options)
        if self.running_margin is not None:
            q = dataclasses.replace(q, running_margin=self.running_margin.update(q.logits))
        outputs = []
        for name, spec in zip(self.names, self.specs, strict=True):
            _check_inputs(name, spec, q)
            outputs.append(spec.fn(q, self.options))
        weighted = zip(outputs[1:], self.weights[1:], strict=True)
        total = sum((out.losses * w for out, w in weighted), outputs[0].losses * self.weights[0])
        if pair_weights is not None:
            total = total * pair_weights
        with_ref = [out for spec, out in zip(self.specs, outputs, strict=True) if spec.needs_reference]
        rewards = (with_ref or outputs)[0]
        per_token = next((out.margins_per_token for out in outputs if out.margins_per_token is not None), None)
        return LossOutput(total, rewards.chosen_rewards, rewards.rejected_rewards, rewards.reward_logps, per_token)


def compile_loss(loss_config: LossConfig) -> LossPlan:
    """Check a run's `LossConfig` and resolve it into the plan the trainer calls per micro-batch."""
    check_loss_config(loss_config)
    specs = tuple(LOSSES[name] for name in loss_config.loss)
    running = RunningMargin() if any(spec.batch_statistics for spec in specs) else None
    return LossPlan(tuple(loss_config.loss), loss_weights(loss_config), specs, LossOptions.from_config(loss_config),
                    running)


def needs_reference(loss_config: LossConfig) -> bool:
    """Whether any loss in the run's configuration needs reference log-probs."""
    return any(get_loss(name).needs_reference for name in loss_config.loss)


def loss_from_config(loss_config: LossConfig, **tensors: Tensor | None) -> LossOutput:
    """The run's loss on one batch, compiled on the spot: for one-off calls; a training or
    evaluation loop compiles once (`compile_loss`) and calls the plan per batch."""
    return compile_loss(loss_config)(**tensors)
