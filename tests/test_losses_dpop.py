"""DPO-Positive (Pal et al. 2024): the penalty that stops the chosen likelihood falling below the reference."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dpokit.losses import LOSSES, preference_loss


def _pair(policy_chosen: float, reference_chosen: float = -2.0) -> dict[str, torch.Tensor]:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dict(policy_chosen_logps=t(policy_chosen).requires_grad_(True), policy_rejected_logps=t(-5.0),
                reference_chosen_logps=t(reference_chosen), reference_rejected_logps=t(-3.0),
                chosen_lengths=t(3.0), rejected_lengths=t(3.0))


def test_dpop_equals_dpo_while_the_chosen_stays_above_the_reference():
    x = _pair(-1.0)  # π_c − ref_c = 1 > 0: no penalty
    dpop = preference_loss("dpop", **x, beta=0.1, dpop_lambda=50.0).losses
    torch.testing.assert_close(dpop, preference_loss("sigmoid", **x, beta=0.1).losses)
    # Δ = 1 − (−2) = 3, βΔ = 0.3: −log σ(0.3)
    assert dpop.item() == math.log1p(math.exp(-0.3))


def test_dpop_penalty_when_the_chosen_falls_below_the_reference():
    x = _pair(-2.5)  # π_c − ref_c = −0.5: penalty λ·0.5 = 25 inside β(…)
    # Δ = −0.5 − (−2) = 1.5; β(Δ − 25) = 0.1·(−23.5) = −2.35: −log σ(−2.35) = log(1 + e^2.35)
    assert preference_loss("dpop", **x, beta=0.1, dpop_lambda=50.0).losses.item() == math.log1p(math.exp(2.35))


def test_dpop_pushes_the_chosen_up_harder_than_dpo_below_the_reference():
    """∂L/∂π_c = −β(1 + λ)σ(−z) below the reference, against DPO's −βσ(−z): same sign, stronger."""
    grads = {}
    for name in ("sigmoid", "dpop"):
        x = _pair(-2.5)
        preference_loss(name, **x, beta=0.1, dpop_lambda=50.0).losses.sum().backward()
        grads[name] = x["policy_chosen_logps"].grad.item()
    z = 0.1 * (1.5 - 50.0 * 0.5)
    expected_gradient = math.isclose(grads["dpop"], -0.1 * 51.0 / (1 + math.exp(z)), rel_tol=1e-12)
    assert expected_gradient and grads["dpop"] < grads["sigmoid"] < 0


def test_the_docs_loss_table_lists_every_loss_with_what_it_needs():
    """Every registered loss has a row; its "what it needs" cell agrees with the registry."""
    text = (Path(__file__).parents[1] / "docs" / "losses.md").read_text(encoding="utf-8")
    section = text.split("## f-divergences", 1)[0]
    needs_of: dict[str, str] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        # rows for the options that change every loss's log-prob reduction (--wpo, --ld-alpha) name no loss
        if row.startswith("| `") and cells[0] != "`--loss`" and not cells[0].startswith("`--"):
            for name in cells[0].replace("(= ", ", ").replace(")", "").split(", "):
                needs_of[name.strip("` ")] = cells[-1]
    assert set(needs_of) == set(LOSSES)
    for name, spec in LOSSES.items():
        assert ("reference" in needs_of[name]) == spec.needs_reference, name
        assert ("lengths" in needs_of[name]) == spec.needs_lengths, name
