"""The DPO loss family: hand-worked values, gradient signs, invariants, dtypes and config checks.

Expected values are computed here from the papers' formulas with the `math` module, never by
calling the function under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dpokit.config import LossConfig, build_config, iter_options, load_yaml
from dpokit.errors import DpokitError
from dpokit.losses import (
    LOSSES,
    LossOutput,
    check_loss_config,
    loss_from_config,
    needs_reference,
    preference_loss,
)

REFERENCE_FREE = {"sft", "simpo", "orpo"}
ALL = sorted(LOSSES)


def parts(out: LossOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return out.losses, out.chosen_rewards, out.rejected_rewards


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def sp(x: float) -> float:
    """softplus: log(1 + e^x); note −log σ(z) = sp(−z)."""
    return math.log1p(math.exp(x))


# The worked example: two pairs, β = 0.5.
#   policy chosen/rejected  [-1, -4] / [-2, -3]     reference chosen/rejected  [-1.5, -3] / [-1.5, -3.5]
#   lr_c = [0.5, -1]   lr_r = [-0.5, 0.5]   Δ = [1, -1.5]   βΔ = z = [0.5, -0.75]
#   lengths chosen/rejected [2, 4] / [4, 2]
BETA = 0.5
PC, PR, RC, RR = [-1.0, -4.0], [-2.0, -3.0], [-1.5, -3.0], [-1.5, -3.5]
LC, LR = [2.0, 4.0], [4.0, 2.0]
LR_C, LR_R = [0.5, -1.0], [-0.5, 0.5]
Z = [0.5, -0.75]
A, B = [BETA * x for x in LR_C], [BETA * x for x in LR_R]  # β·lr_c, β·lr_r
AVG_C, AVG_R = [-0.5, -1.0], [-0.5, -1.5]  # π/len
# Losses that length-average report TRL's rewards, β·lr on the sums, like every loss with a reference,
# and the per-token margin they act on: lr_c/len_c = [0.25, -0.25], lr_r/len_r = [-0.125, 0.25].
AVERAGED = {"ipo", "sigmoid_norm"}
PER_TOKEN_MARGINS = [BETA * (0.25 + 0.125), BETA * (-0.25 - 0.25)]


def inputs(dtype=torch.float64, **over):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    base = dict(
        policy_chosen_logps=t(PC),
        policy_rejected_logps=t(PR),
        reference_chosen_logps=t(RC),
        reference_rejected_logps=t(RR),
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
    )
    return {**base, **over}


def exo(z: float, eps: float) -> float:
    q = sig(z)
    return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))


def disco(z: float, tau: float) -> float:
    m = sig(z / tau)
    return (1 - m) * sp(-z) + m * math.exp(-z)


def log_odds(x: float) -> float:
    return x - math.log(1 - math.exp(x))


# name -> (options, expected per-example losses)
HAND = {
    "sigmoid": ({}, [sp(-z) for z in Z]),
    "dpo": ({}, [sp(-z) for z in Z]),
    "robust": ({"label_smoothing": 0.1}, [(0.9 * sp(-z) - 0.1 * sp(z)) / 0.8 for z in Z]),
    "hinge": ({}, [0.5, 1.75]),
    # gap = lr_c/len_c − lr_r/len_r = [0.375, −0.5]; target 1/(2β) = 1
    "ipo": ({}, [0.390625, 2.25]),
    "exo_pair": ({"label_smoothing": 0.1}, [exo(z, 0.1) for z in Z]),
    "nca_pair": ({}, [sp(-a) + 0.5 * sp(a) + 0.5 * sp(b) for a, b in zip(A, B, strict=True)]),
    "bco_pair": ({}, [sp(-a) + sp(b) for a, b in zip(A, B, strict=True)]),
    # (lr_c − 1)² + (lr_r + 1)²
    "sppo_hard": ({}, [0.5, 6.25]),
    # sorted(π_c − π_r) = [−1, 1]; sorted(ref_c − ref_r) = [0, 0.5]; δ = [−1, 0.5]
    "aot": ({}, [sp(0.5), sp(-0.25)]),
    # sorted(lr_c) = [−1, 0.5]; sorted(lr_r) = [−0.5, 0.5]; δ = [−0.5, 0]
    "aot_unpaired": ({}, [sp(0.25), math.log(2)]),
    "apo_zero": ({}, [1 - sig(a) + sig(b) for a, b in zip(A, B, strict=True)]),
    "apo_down": ({}, [sig(a) + 1 - sig(z) for a, z in zip(A, Z, strict=True)]),
    "discopop": ({"discopop_tau": 0.05}, [disco(z, 0.05) for z in Z]),
    # β·gap = [0.1875, −0.25]
    "sigmoid_norm": ({}, [sp(-0.1875), sp(0.25)]),
    # βΔ + α(len_c − len_r) = [0.5 − 0.2, −0.75 + 0.2]
    "rdpo": ({"rdpo_alpha": 0.1}, [sp(-0.3), sp(0.55)]),
    # π_c below ref_c by s = relu(−lr_c) = [0, 1]; β(Δ − λs) = [0.5, 0.5·(−1.5 − 2)]: pair 1 is plain DPO
    "dpop": ({"dpop_lambda": 2.0}, [sp(-0.5), sp(1.75)]),
    # One-off call: M0 is the batch's own mean margin; ρB = 1.6 keeps both pairs, so M̄ = M0 and β_batch = β: DPO
    "beta_dpo": ({"beta_dpo_rho": 0.8}, [sp(-z) for z in Z]),
    "sft": ({}, [0.5, 1.0]),
    # β(avg_c − avg_r) − γ = [−0.5, −0.25]
    "simpo": ({"simpo_gamma": 0.5}, [sp(0.5), sp(0.25)]),
    "orpo": (
        {"orpo_lambda": 0.1},
        [-c + 0.1 * sp(-(log_odds(c) - log_odds(r))) for c, r in zip(AVG_C, AVG_R, strict=True)],
    ),
}


def test_every_loss_has_a_hand_worked_value():
    assert set(HAND) == set(LOSSES)


@pytest.mark.parametrize("name", ALL)
def test_hand_worked_value(name):
    options, expected = HAND[name]
    out = preference_loss(name, **inputs(), beta=BETA, **options)
    assert isinstance(out, LossOutput)
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    free = ([BETA * x for x in AVG_C], [BETA * x for x in AVG_R])  # β·π/len
    rewards = free if name in REFERENCE_FREE else (A, B)  # β·lr
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(rewards[0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(rewards[1], dtype=torch.float64))
    if name in AVERAGED:
        torch.testing.assert_close(out.margins_per_token, torch.tensor(PER_TOKEN_MARGINS, dtype=torch.float64))
    else:
        assert out.margins_per_token is None


def test_some_values_as_literals():
    """A few of the worked values as plain numbers, so a shared helper cannot hide a slip."""
    out = lambda name, **o: preference_loss(name, **inputs(), beta=BETA, **o).losses.tolist()  # noqa: E731
    assert out("sigmoid") == pytest.approx([0.474077, 1.136871], abs=1e-6)
    assert out("hinge") == pytest.approx([0.5, 1.75])
    assert out("ipo") == pytest.approx([0.390625, 2.25])
    assert out("sppo_hard") == pytest.approx([0.5, 6.25])
    assert out("sft") == pytest.approx([0.5, 1.0])
    assert out("sigmoid", label_smoothing=0.1) == pytest.approx(  # cDPO
        [0.9 * 0.474077 + 0.1 * 0.974077, 0.9 * 1.136871 + 0.1 * 0.386871], abs=1e-6
    )


@pytest.mark.parametrize(
    ("f_divergence", "score"),
    [
        ("reverse_kl", lambda lr: lr),
        ("forward_kl", lambda lr: 1 - math.exp(-lr)),
        ("js_divergence", lambda lr: math.log(2) + math.log(sig(lr))),
        ("alpha_divergence", lambda lr: (math.exp(-0.5 * lr) - 1) / -0.5),  # α = 0.5
    ],
)
def test_f_divergence_scores(f_divergence, score):
    z = [BETA * (score(c) - score(r)) for c, r in zip(LR_C, LR_R, strict=True)]
    out = preference_loss("sigmoid", **inputs(), beta=BETA, f_divergence=f_divergence, alpha_divergence_coef=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([sp(-x) for x in z], dtype=torch.float64))
    hinge = preference_loss("hinge", **inputs(), beta=BETA, f_divergence=f_divergence, alpha_divergence_coef=0.5)
    torch.testing.assert_close(hinge.losses, torch.tensor([max(0.0, 1 - x) for x in z], dtype=torch.float64))
    # Rewards stay β·(policy − reference) whatever the divergence.
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(A, dtype=torch.float64))


def test_alpha_divergence_at_one_is_reverse_kl():
    a = preference_loss("ipo", **inputs(), beta=BETA, f_divergence="alpha_divergence", alpha_divergence_coef=1.0)
    b = preference_loss("ipo", **inputs(), beta=BETA)
    torch.testing.assert_close(a.losses, b.losses)


def test_f_divergence_rejected_where_it_does_not_apply():
    with pytest.raises(DpokitError, match="--f-divergence"):
        preference_loss("nca_pair", **inputs(), f_divergence="forward_kl")


# ---------------------------------------------------------------------------------------------
# Invariants


def random_inputs(n=16, dtype=torch.float64, seed=0, **over):
    g = torch.Generator().manual_seed(seed)
    logp = lambda: -torch.rand(n, generator=g, dtype=torch.float64) * 20  # noqa: E731
    lengths = lambda: torch.randint(1, 30, (n,), generator=g).to(torch.float64)  # noqa: E731
    base = dict(
        policy_chosen_logps=logp(),
        policy_rejected_logps=logp(),
        reference_chosen_logps=logp(),
        reference_rejected_logps=logp(),
        chosen_lengths=lengths(),
        rejected_lengths=lengths(),
    )
    return {k: v.to(dtype) for k, v in {**base, **over}.items()}


def test_sigmoid_is_ln2_when_policy_equals_reference():
    x = random_inputs()
    x["reference_chosen_logps"] = x["policy_chosen_logps"].clone()
    x["reference_rejected_logps"] = x["policy_rejected_logps"].clone()
    out = preference_loss("sigmoid", **x, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((16,), math.log(2), dtype=torch.float64))


def test_ipo_is_minimised_at_the_target_margin():
    beta = 0.25
    target = 1 / (2 * beta)
    lc = torch.tensor([3.0], dtype=torch.float64)

    def loss_at(gap: float) -> torch.Tensor:
        pc = torch.tensor([gap * 3.0], dtype=torch.float64, requires_grad=True)  # lr_c/len_c = gap, lr_r = 0
        zero = torch.zeros(1, dtype=torch.float64)
        out = preference_loss(
            "ipo", policy_chosen_logps=pc, policy_rejected_logps=zero, reference_chosen_logps=zero,
            reference_rejected_logps=zero, chosen_lengths=lc, rejected_lengths=lc, beta=beta,
        )  # fmt: skip
        out.losses.sum().backward()
        return out.losses.detach(), pc.grad

    at, grad = loss_at(target)
    assert at.item() == pytest.approx(0.0, abs=1e-24) and grad.item() == pytest.approx(0.0, abs=1e-12)
    for delta in (-1.0, -0.01, 0.01, 1.0):
        assert loss_at(target + delta)[0].item() > at.item()


def test_robust_with_zero_epsilon_equals_sigmoid():
    x = random_inputs()
    a = preference_loss("robust", **x, beta=0.3, label_smoothing=0.0)
    b = preference_loss("sigmoid", **x, beta=0.3)
    torch.testing.assert_close(a.losses, b.losses)


def test_robust_is_unbiased_over_label_flips():
    """rDPO's point (Chowdhury et al. 2024, Lemma 3.1): averaged over flips at rate ε it is the clean loss."""
    x, eps = random_inputs(), 0.2
    flipped = dict(x)
    flipped["policy_chosen_logps"], flipped["policy_rejected_logps"] = x["policy_rejected_logps"], x["policy_chosen_logps"]
    flipped["reference_chosen_logps"], flipped["reference_rejected_logps"] = (
        x["reference_rejected_logps"], x["reference_chosen_logps"],
    )  # fmt: skip
    mix = (1 - eps) * preference_loss("robust", **x, label_smoothing=eps).losses + eps * preference_loss(
        "robust", **flipped, label_smoothing=eps
    ).losses
    torch.testing.assert_close(mix, preference_loss("sigmoid", **x).losses)


def test_special_cases_reduce_to_dpo():
    x = random_inputs()
    dpo = preference_loss("sigmoid", **x, beta=0.2).losses
    torch.testing.assert_close(preference_loss("rdpo", **x, beta=0.2, rdpo_alpha=0.0).losses, dpo)
    ones = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(
        preference_loss("sigmoid_norm", **{**x, "chosen_lengths": ones, "rejected_lengths": ones}, beta=0.2).losses,
        dpo,
    )
    one = {k: v[:1] for k, v in x.items()}  # a batch of one: nothing to sort
    torch.testing.assert_close(preference_loss("aot", **one, beta=0.2).losses, dpo[:1])
    torch.testing.assert_close(preference_loss("aot_unpaired", **one, beta=0.2).losses, dpo[:1])


def test_rdpo_credits_length_to_the_penalty():
    """With α > 0 a longer chosen response needs less log-ratio margin (Park et al. 2024: reward r − α·len)."""
    x = random_inputs()
    x["chosen_lengths"] = x["rejected_lengths"] + 10
    dpo = preference_loss("sigmoid", **x).losses
    assert bool((preference_loss("rdpo", **x, rdpo_alpha=0.05).losses < dpo).all())


def test_orpo_log_odds_stay_finite_near_probability_one():
    x = inputs()
    tiny = torch.tensor([-1e-30, -1e-9], dtype=torch.float64)
    x["policy_chosen_logps"] = tiny.clone().requires_grad_(True)
    out = preference_loss("orpo", **x)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(x["policy_chosen_logps"].grad).all()


def test_discopop_stays_finite_for_large_margins():
    x = random_inputs()
    x["policy_chosen_logps"] = x["policy_chosen_logps"] - 1e4  # βΔ far below −88: e^(−βΔ) alone overflows
    out = preference_loss("discopop", **x, beta=1.0)
    assert torch.isfinite(out.losses).all()


# ---------------------------------------------------------------------------------------------
# Gradient signs: raising the chosen log-prob never raises the loss; raising the rejected never lowers it.

MONOTONE = {
    "sigmoid", "dpo", "robust", "hinge", "bco_pair", "aot", "aot_unpaired", "apo_zero", "sigmoid_norm", "rdpo",
    "dpop", "beta_dpo", "sft", "simpo", "orpo",
}  # fmt: skip
# Losses with a target (they stop pushing, or push back, past it): checked where training starts,
# policy = reference. apo_down is designed to lower the chosen likelihood too, so only its rejected
# side is checked. discopop (τ = 0.05) is non-monotone for |βΔ| ≲ 0.2, as TRL's definition is; it is
# checked away from there.
TARGETED = {"ipo", "sppo_hard", "exo_pair", "nca_pair"}


def grads(name, x, **options):
    x = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in x.items()}
    preference_loss(name, **x, **options).losses.sum().backward()
    return x["policy_chosen_logps"].grad, x["policy_rejected_logps"].grad


def options_for(name):
    return {"label_smoothing": 0.1} if name == "exo_pair" else {}


@pytest.mark.parametrize("name", sorted(MONOTONE))
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_sign_everywhere(name, seed):
    gc, gr = grads(name, random_inputs(seed=seed), beta=[0.1, 1.0][seed])
    assert bool((gc <= 0).all())
    if name not in {"sft"}:
        assert bool((gr >= 0).all())


@pytest.mark.parametrize("name", sorted(TARGETED | {"apo_down", "sigmoid"}))
def test_gradient_sign_at_the_start(name):
    x = random_inputs()
    x["reference_chosen_logps"] = x["policy_chosen_logps"].clone()
    x["reference_rejected_logps"] = x["policy_rejected_logps"].clone()
    # sigmoid with ε > 0 (cDPO) has a target too
    opts = {"label_smoothing": 0.1} if name in ("exo_pair", "sigmoid") else {}
    gc, gr = grads(name, x, **opts)
    assert bool((gr > 0).all())
    assert bool((gc <= 1e-12).all()) if name == "apo_down" else bool((gc < 0).all())


def test_discopop_gradient_sign_away_from_zero():
    x = random_inputs()
    margin = torch.linspace(-30, 30, 16, dtype=torch.float64)
    margin = margin + margin.sign() * 0.5  # |βΔ| ≥ 0.5 with β = 1
    x["reference_chosen_logps"] = x["policy_chosen_logps"] - margin
    x["reference_rejected_logps"] = x["policy_rejected_logps"].clone()
    gc, gr = grads("discopop", x, beta=1.0)
    assert bool((gc <= 0).all()) and bool((gr >= 0).all())


def test_every_loss_has_a_gradient_sign_test():
    assert MONOTONE | TARGETED | {"apo_down", "discopop"} == set(LOSSES)


# ---------------------------------------------------------------------------------------------
# Reference-free losses, dtypes, devices


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_ignore_reference(name):
    assert LOSSES[name].needs_reference is False
    x = random_inputs()
    x["policy_chosen_logps"].requires_grad_(True)
    none = preference_loss(name, **{**x, "reference_chosen_logps": None, "reference_rejected_logps": None})
    rc = (torch.randn(16, dtype=torch.float64) * 5).requires_grad_(True)
    rr = (torch.randn(16, dtype=torch.float64) * 5).requires_grad_(True)
    rand = preference_loss(name, **{**x, "reference_chosen_logps": rc, "reference_rejected_logps": rr})
    for a, b in zip(parts(none), parts(rand), strict=True):
        assert torch.equal(a, b)
    rand.losses.sum().backward()
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("name", sorted(set(LOSSES) - REFERENCE_FREE))
def test_reference_based_losses_need_a_reference(name):
    assert LOSSES[name].needs_reference is True
    x = {**random_inputs(), "reference_chosen_logps": None, "reference_rejected_logps": None}
    with pytest.raises(DpokitError, match=f"--loss {name} needs reference"):
        preference_loss(name, **x, **options_for(name))


@pytest.mark.parametrize("name", ALL)
def test_float32_agrees_with_float64(name):
    x64 = random_inputs(seed=3)
    x64["policy_chosen_logps"] = x64["reference_chosen_logps"] + torch.linspace(-3, 3, 16, dtype=torch.float64)
    x32 = {k: v.float() for k, v in x64.items()}
    opts = {"beta": 0.5, **options_for(name)}
    divergences = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
    for f in divergences if LOSSES[name].f_divergence else ("reverse_kl",):
        o64 = preference_loss(name, **x64, f_divergence=f, **opts)
        o32 = preference_loss(name, **x32, f_divergence=f, **opts)
        for a, b in zip(parts(o32), parts(o64), strict=True):
            assert a.dtype == torch.float32 and b.dtype == torch.float64
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_runs_on_meta_tensors(name):
    """Meta tensors have no data: a loss that synced to the host (.item(), data-dependent Python) would fail."""
    x = {k: torch.zeros(4, device="meta") for k in random_inputs()}
    out = preference_loss(name, **x, **options_for(name))
    assert all(t.device.type == "meta" and t.shape == (4,) for t in parts(out))


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="gamma"):
        preference_loss("simpo", **inputs(), gamma=1.0)


# ---------------------------------------------------------------------------------------------
# Configuration: checks, combination, the contract with the trainer


def cfg(**over) -> LossConfig:
    return dataclasses.replace(LossConfig(), **over)


def test_defaults_are_valid_and_documented():
    check_loss_config(LossConfig())
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert {"loss_weights", "f_divergence", "alpha_divergence_coef", "discopop_tau", "simpo_gamma", "orpo_lambda",
            "rdpo_alpha"} <= loss_fields  # fmt: skip
    for f in dataclasses.fields(LossConfig):
        assert f.metadata["help"]
        if f.name not in ("loss", "loss_weights", "f_divergence"):
            assert "default" in f.metadata["help"], f.name
    names = [f.name for _, f in iter_options()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("over", "flag"),
    [
        ({"loss": "dpo2"}, "--loss"),
        ({"loss": "sigmoid,nope"}, "--loss"),
        ({"loss": "sigmoid,sigmoid"}, "--loss"),
        ({"loss": "exo_pair"}, "--label-smoothing"),
        ({"loss": "robust", "label_smoothing": 0.5}, "--label-smoothing"),
        ({"loss": "sigmoid", "label_smoothing": -0.1}, "--label-smoothing"),
        ({"loss": "hinge", "label_smoothing": 0.1}, "--label-smoothing"),
        ({"loss": "sigmoid,sft", "loss_weights": "1"}, "--loss-weights"),
        ({"loss": "sigmoid,sft", "loss_weights": "1,x"}, "--loss-weights"),
        ({"loss": "sigmoid,sft", "loss_weights": "0,0"}, "--loss-weights"),
        ({"loss": "sigmoid", "loss_weights": "-1"}, "--loss-weights"),
        ({"beta": 0.0}, "--beta"),
        ({"f_divergence": "kl"}, "--f-divergence"),
        ({"loss": "simpo", "f_divergence": "forward_kl"}, "--f-divergence"),
        ({"loss": "sigmoid,apo_zero", "f_divergence": "js_divergence"}, "--f-divergence"),
        ({"alpha_divergence_coef": 0.0}, "--alpha-divergence-coef"),
        ({"discopop_tau": 0.0}, "--discopop-tau"),
        ({"simpo_gamma": -1.0}, "--simpo-gamma"),
        ({"orpo_lambda": float("nan")}, "--orpo-lambda"),
        ({"rdpo_alpha": -0.1}, "--rdpo-alpha"),
        ({"loss": "dpop", "dpop_lambda": -1.0}, "--dpop-lambda"),
        ({"loss": "beta_dpo", "beta_dpo_alpha": -0.1}, "--beta-dpo-alpha"),
        ({"loss": "beta_dpo", "beta_dpo_rho": 0.0}, "--beta-dpo-rho"),
        ({"loss": "beta_dpo", "beta_dpo_rho": 1.5}, "--beta-dpo-rho"),
        ({"loss": "beta_dpo,sft"}, "--loss beta_dpo"),
    ],
)
def test_bad_configurations_fail_in_one_line(over, flag):
    with pytest.raises(DpokitError) as info:
        check_loss_config(cfg(**over))
    message = str(info.value)
    assert flag in message and "\n" not in message


@pytest.mark.parametrize(
    "over",
    [
        {"loss": "exo_pair", "label_smoothing": 1e-3},
        {"loss": "robust", "label_smoothing": 0.49},
        {"loss": "sigmoid,sft", "loss_weights": "1,0.5", "f_divergence": "forward_kl"},
        {"loss": "ipo,hinge", "label_smoothing": 0.0},
        {"loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0},
        {"loss": "aot,sft", "label_smoothing": 0.1},
    ],
)
def test_good_configurations_pass(over):
    check_loss_config(cfg(**over))


def test_validate_runs_the_loss_checks():
    required = {"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "out"}}
    build_config(required, {"loss": {"loss": "exo_pair", "label_smoothing": 0.01}})
    with pytest.raises(DpokitError, match="--label-smoothing"):
        build_config(required, {"loss": {"loss": "exo_pair"}})
    with pytest.raises(DpokitError, match="--loss"):
        build_config(required, {"loss": {"loss": "kto"}})


def test_yaml_lists_are_accepted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  loss: [sigmoid, sft]\n  loss_weights: [1, 0.5]\n")
    layer = load_yaml(path)
    lo = cfg(**layer["loss"])
    check_loss_config(lo)
    x = random_inputs()
    out = loss_from_config(lo, **x)
    expected = preference_loss("sigmoid", **x).losses + 0.5 * preference_loss("sft", **x).losses
    torch.testing.assert_close(out.losses, expected)


def test_needs_reference():
    assert needs_reference(cfg(loss="sigmoid"))
    assert not needs_reference(cfg(loss="simpo"))
    assert not needs_reference(cfg(loss="orpo,sft"))
    assert needs_reference(cfg(loss="sft,ipo"))


def test_loss_from_config_combines_with_weights():
    x = random_inputs()
    lo = cfg(loss="sft,sigmoid", loss_weights="0.5,2", beta=0.2)
    out = loss_from_config(lo, **x)
    sft, dpo = preference_loss("sft", **x, beta=0.2), preference_loss("sigmoid", **x, beta=0.2)
    torch.testing.assert_close(out.losses, 0.5 * sft.losses + 2 * dpo.losses)
    # rewards come from the first reference-based loss
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, dpo.rejected_rewards)


def test_loss_from_config_reference_free_without_reference():
    x = {**random_inputs(), "reference_chosen_logps": None, "reference_rejected_logps": None}
    lo = cfg(loss="simpo,sft", beta=2.0, simpo_gamma=1.0)
    assert not needs_reference(lo)
    out = loss_from_config(lo, **x)
    simpo = preference_loss("simpo", **x, beta=2.0, simpo_gamma=1.0)
    torch.testing.assert_close(out.losses, simpo.losses + preference_loss("sft", **x, beta=2.0).losses)
    torch.testing.assert_close(out.chosen_rewards, simpo.chosen_rewards)


def test_loss_from_config_passes_every_option():
    x = random_inputs()
    lo = cfg(loss="discopop", beta=0.3, discopop_tau=0.2, f_divergence="js_divergence")
    expected = preference_loss("discopop", **x, beta=0.3, discopop_tau=0.2, f_divergence="js_divergence")
    torch.testing.assert_close(loss_from_config(lo, **x).losses, expected.losses)
    lo = cfg(loss="rdpo", rdpo_alpha=0.2)
    torch.testing.assert_close(loss_from_config(lo, **x).losses, preference_loss("rdpo", **x, rdpo_alpha=0.2).losses)
