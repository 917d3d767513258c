"""Tests written to kill mutants of losses.py that the suite let survive (benchmarks/mutation.py).

Each names the deliberate change it catches; the values are worked by hand from the formulas.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dpokit.config import LossConfig
from dpokit.errors import DpokitError
from dpokit.losses import _FUNCTIONS, LOSSES, _log_odds, compile_loss, preference_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_without_smoothing_is_finite_when_the_rejected_response_is_impossible():
    # Δ = +inf (π_r = −inf): −log σ(βΔ) = 0. The ε = 0 branch exists because 0 · log σ(−βΔ) = 0 · −inf is NaN.
    out = preference_loss("sigmoid", policy_chosen_logps=_t(-1.0), policy_rejected_logps=_t(-math.inf),
                          reference_chosen_logps=_t(-1.0), reference_rejected_logps=_t(-2.0), label_smoothing=0.0)
    assert out.losses.tolist() == [0.0]


def _beta_dpo_losses(alpha: float, rho: float) -> list[float]:
    """β-DPO at β = 0.5 on margins Δ = 0, 1, 2, 10 (reference 0, rejected 0)."""
    delta, zeros = _t(0.0, 1.0, 2.0, 10.0), torch.zeros(4, dtype=torch.float64)
    return preference_loss("beta_dpo", policy_chosen_logps=delta, policy_rejected_logps=zeros,
                           reference_chosen_logps=zeros, reference_rejected_logps=zeros,
                           beta=0.5, beta_dpo_alpha=alpha, beta_dpo_rho=rho).losses.tolist()


def _kept_middle_pairs(beta: float) -> list[float]:
    """Pairs Δ = 1 and 2 kept at β_batch, their losses scaled by B/k = 2."""
    softplus = lambda x: F.softplus(torch.tensor(x, dtype=torch.float64)).item()  # noqa: E731
    return [0.0, 2 * softplus(-beta * 1.0), 2 * softplus(-beta * 2.0), 0.0]


def test_beta_dpo_keeps_the_pairs_nearest_the_running_margin_at_the_scaled_beta():
    # Margins Δ = 0, 1, 2, 10 (reference 0, rejected 0): M0 = their mean 3.25; ρ = 0.5 keeps the two
    # nearest M0 (Δ = 2 and 1), M̄ = 1.5, β_batch = β(1 + α(M̄ − M0)) = 0.5 · (1 − 0.2 · 1.75) = 0.325;
    # kept losses are scaled by B/k = 2.
    assert _beta_dpo_losses(alpha=0.2, rho=0.5) == pytest.approx(_kept_middle_pairs(0.5 * (1 + 0.2 * (1.5 - 3.25))),
                                                                  rel=1e-12)


def test_beta_dpo_keeps_one_pair_when_rho_b_is_below_one():
    # ρB = 0.1 · 4 = 0.4: ⌈0.4⌉ = 1 pair kept (the nearest M0), at weight B/1 = 4.
    assert [loss != 0 for loss in _beta_dpo_losses(alpha=0.0, rho=0.1)] == [False, False, True, False]


@pytest.mark.parametrize("missing", ["reference_chosen_logps", "reference_rejected_logps"])
def test_one_missing_reference_tensor_is_refused(missing):
    tensors = {"policy_chosen_logps": _t(-1.0), "policy_rejected_logps": _t(-2.0),
               "reference_chosen_logps": _t(-1.5), "reference_rejected_logps": _t(-1.5)}
    tensors[missing] = None
    with pytest.raises(DpokitError, match="needs reference log-probs"):
        preference_loss("sigmoid", **tensors)


@pytest.mark.parametrize("missing", ["chosen_lengths", "rejected_lengths"])
def test_one_missing_length_tensor_is_refused(missing):
    tensors = {"policy_chosen_logps": _t(-1.0), "policy_rejected_logps": _t(-2.0), "reference_chosen_logps": _t(-1.5),
               "reference_rejected_logps": _t(-1.5), "chosen_lengths": _t(3.0), "rejected_lengths": _t(4.0)}
    tensors[missing] = None
    with pytest.raises(DpokitError, match="needs response lengths"):
        preference_loss("ipo", **tensors)


def test_log_odds_is_exact_on_both_branches():
    # log(p / (1 − p)) from log p, on either side of the branch point log p = −ln 2.
    logp = _t(-8.0, -2.0, -1.0, -0.7, -0.69, -0.5, -0.1, -1e-3, -1e-8)
    p = logp.exp()
    expected = logp - torch.log1p(-p)
    torch.testing.assert_close(_log_odds(logp), expected, rtol=1e-10, atol=0)


def test_registry_docs_are_the_functions_docstrings():
    for name, spec in LOSSES.items():
        assert spec.doc and spec.doc == _FUNCTIONS[name][0].__doc__.strip(), name


def test_a_compiled_plan_and_its_entries_are_frozen():
    plan = compile_loss(LossConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.names = ("ipo",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.specs[0].needs_reference = False


def test_the_plan_reports_the_per_token_margin_of_a_length_averaging_loss():
    plan = compile_loss(LossConfig(loss=("ipo",), beta=0.1))
    out = plan(policy_chosen_logps=_t(-6.0), policy_rejected_logps=_t(-9.0), reference_chosen_logps=_t(-8.0),
               reference_rejected_logps=_t(-8.0), chosen_lengths=_t(2.0), rejected_lengths=_t(4.0))
    # β(lr_c/len_c − lr_r/len_r) = 0.1 · (2/2 − (−1)/4) = 0.125
    assert out.margins_per_token.tolist() == pytest.approx([0.125], rel=1e-12)


def test_pair_weights_scale_each_pair_s_total_loss_and_not_the_rewards():
    plan = compile_loss(LossConfig(loss=("sigmoid", "ipo"), loss_weights=(1.0, 0.5), beta=0.1))
    tensors = {"policy_chosen_logps": _t(-6.0, -3.0), "policy_rejected_logps": _t(-9.0, -2.0),
               "reference_chosen_logps": _t(-8.0, -3.0), "reference_rejected_logps": _t(-8.0, -3.0),
               "chosen_lengths": _t(2.0, 3.0), "rejected_lengths": _t(4.0, 1.0)}
    plain = plan(**tensors)
    weighted = plan(**tensors, pair_weights=_t(0.25, 3.0))
    torch.testing.assert_close(weighted.losses, plain.losses * _t(0.25, 3.0), rtol=1e-12, atol=0)
    assert torch.equal(weighted.chosen_rewards, plain.chosen_rewards)


def test_beta_dpo_batch_beta_is_floored_at_a_thousandth_of_beta():
    # α = 10: 1 + α(M̄ − M0) = 1 − 17.5 < 0, so β_batch = 1e-3 · β = 5e-4 on the two kept pairs.
    assert _beta_dpo_losses(alpha=10.0, rho=0.5) == pytest.approx(_kept_middle_pairs(5e-4), rel=1e-12)
