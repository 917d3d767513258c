"""Every loss stays finite at extreme log-ratios, in float32 and bfloat16, wherever TRL 1.16's does."""

from __future__ import annotations

import pytest
import torch

from dpokit.losses import F_DIVERGENCES, LOSSES, preference_loss

# (chosen log-ratio, rejected log-ratio) in nats: the case, its mirror, and both far out.
EXTREMES = {"far apart": (139.0, -106.0), "mirrored": (-106.0, 139.0), "both high": (3000.0, 2000.0),
            "both low": (-3000.0, -2000.0), "huge": (1e4, -1e4)}
DTYPES = (torch.float32, torch.bfloat16)


def _loss(name: str, logratios: tuple[float, float], dtype: torch.dtype, **options):
    reference_chosen = torch.tensor([-200.0, -50.0], dtype=dtype)
    reference_rejected = torch.tensor([-180.0, -60.0], dtype=dtype)
    if LOSSES[name].needs_reference:
        policy_chosen = (reference_chosen + logratios[0]).requires_grad_()
        policy_rejected = (reference_rejected + logratios[1]).requires_grad_()
    else:  # reference-free: extreme (summed) log-probs themselves, down to -|x|
        policy_chosen = torch.tensor([-abs(logratios[0]), -0.0], dtype=dtype, requires_grad=True)
        policy_rejected = torch.tensor([-0.0, -abs(logratios[1])], dtype=dtype, requires_grad=True)
    if name == "exo_pair":
        options.setdefault("label_smoothing", 1e-3)
    out = preference_loss(name, policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
                          reference_chosen_logps=reference_chosen, reference_rejected_logps=reference_rejected,
                          chosen_lengths=torch.tensor([10.0, 3.0], dtype=dtype),
                          rejected_lengths=torch.tensor([7.0, 2.0], dtype=dtype), **options)
    return out, (policy_chosen, policy_rejected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_at_extreme_logratios(name, dtype):
    for case, logratios in EXTREMES.items():
        out, inputs = _loss(name, logratios, dtype)
        for what, tensor in (("loss", out.losses), ("chosen reward", out.chosen_rewards),
                             ("rejected reward", out.rejected_rewards)):
            assert torch.isfinite(tensor).all(), (case, what, tensor)
        out.losses.float().sum().backward()
        for tensor in inputs:
            assert tensor.grad is None or torch.isfinite(tensor.grad).all(), (case, "gradient", tensor.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", [f for f in F_DIVERGENCES if f != "reverse_kl"])
def test_f_divergences_are_finite_at_extreme_logratios(divergence, dtype):
    for name in sorted(n for n, spec in LOSSES.items() if spec.f_divergence and spec.needs_reference):
        for case, logratios in EXTREMES.items():
            out, _ = _loss(name, logratios, dtype, f_divergence=divergence)
            if name == "ipo" and divergence != "js_divergence":
                # IPO squares the score gap: past e^80 nats of score it overflows, as TRL's does.
                assert not torch.isnan(out.losses).any(), (name, case)
                continue
            assert torch.isfinite(out.losses).all(), (name, case, out.losses)


def test_forward_kl_gives_trl_s_zero_for_a_pair_far_apart():
    # chosen +139, rejected -106 nats: the rejected score 1 - e^106 is beyond float32, and TRL's
    # per-example loss is 0; the label-smoothing term (ε = 0) must not turn it into 0·(-inf) = NaN.
    out, _ = _loss("sigmoid", (139.0, -106.0), torch.float32, f_divergence="forward_kl")
    assert out.losses.tolist() == [0.0, 0.0]
