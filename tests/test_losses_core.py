"""Hand-worked values for the DPO loss the trainer is built on (the loss family has its own tests)."""

import math

import torch

from dpokit.losses import preference_loss


def _dpo(pc, pr, rc, rr, beta=0.1, eps=0.0):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return preference_loss(
        "sigmoid",
        policy_chosen_logps=t(pc), policy_rejected_logps=t(pr),
        reference_chosen_logps=t(rc), reference_rejected_logps=t(rr),
        chosen_lengths=t([1.0] * len(pc)), rejected_lengths=t([1.0] * len(pc)),
        beta=beta, label_smoothing=eps,
    )


def test_loss_is_ln2_when_policy_equals_reference():
    out = _dpo([-3.0, -7.5], [-4.0, -2.0], [-3.0, -7.5], [-4.0, -2.0])
    assert torch.allclose(out.losses, torch.full((2,), math.log(2.0), dtype=torch.float64))
    assert torch.equal(out.chosen_rewards, torch.zeros(2, dtype=torch.float64))


def test_hand_worked_value():
    # Δ = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2 ; βΔ = 0.5 * 2 = 1 ; -log σ(1) = log(1 + e^-1)
    out = _dpo([-1.0], [-3.0], [-2.0], [-2.0], beta=0.5)
    assert math.isclose(out.losses.item(), math.log(1 + math.exp(-1.0)), rel_tol=1e-12)
    assert math.isclose(out.chosen_rewards.item(), 0.5, rel_tol=1e-12)
    assert math.isclose(out.rejected_rewards.item(), -0.5, rel_tol=1e-12)
    # conservative DPO, ε = 0.2: 0.8 * log(1 + e^-1) + 0.2 * log(1 + e^1)
    out = _dpo([-1.0], [-3.0], [-2.0], [-2.0], beta=0.5, eps=0.2)
    expected = 0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0))
    assert math.isclose(out.losses.item(), expected, rel_tol=1e-12)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-5.0, -1.0], requires_grad=True)
    pr = torch.tensor([-4.0, -6.0], requires_grad=True)
    ref = torch.tensor([-4.5, -3.0])
    out = preference_loss(
        "sigmoid", policy_chosen_logps=pc, policy_rejected_logps=pr,
        reference_chosen_logps=ref, reference_rejected_logps=ref,
        chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2), beta=0.1,
    )
    out.losses.sum().backward()
    # Gradient descent moves against the gradient: chosen up (negative grad), rejected down.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dx of -log σ(β(x - c)) at the pair is -β σ(-βΔ); check the first pair by hand.
    delta = (-5.0 - -4.5) - (-4.0 - -4.5)
    assert math.isclose(pc.grad[0].item(), -0.1 / (1 + math.exp(0.1 * delta)), rel_tol=1e-6)
