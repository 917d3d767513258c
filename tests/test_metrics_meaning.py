"""Metrics under TRL's names mean what TRL 1.16's mean: rewards/* on the SUMMED log-ratios and
logps/* the summed log-probs, for every loss, IPO and sigmoid_norm included (TRL's
dpo_trainer.py: `chosen_rewards = self.beta * chosen_logratios`, on sums, after every loss type);
the per-token margin that IPO and sigmoid_norm act on has a name of its own. Also: the α of the
α-divergence. (TRL's own code, where it is installed: tests/test_trl_parity.py.)"""

from __future__ import annotations

import pytest
import torch

from dpokit.config import LossConfig
from dpokit.losses import loss_from_config
from dpokit.metrics import PER_TOKEN_METRIC, PairMetrics
from dpokit.model.logprobs import PairLogps

# Two pairs. Pair 1: chosen gains 2 nats over 20 tokens (0.1 per token), rejected 1 nat over 4
# (0.25 per token): summed, chosen wins; per token (what IPO optimises) it loses. Pair 2: chosen
# loses 3 nats over 6 tokens, rejected gains 0.5 over 5 tokens: chosen loses either way.
LOGPS = PairLogps(chosen_logps=torch.tensor([-10.0, -9.0]), rejected_logps=torch.tensor([-5.0, -7.5]),
                  chosen_lengths=torch.tensor([20.0, 6.0]), rejected_lengths=torch.tensor([4.0, 5.0]))
REFERENCE = (torch.tensor([-12.0, -6.0]), torch.tensor([-6.0, -8.0]))
BETA = 0.1


def _metrics(loss: str, beta: float = BETA) -> dict[str, float]:
    out = loss_from_config(LossConfig(loss=loss, beta=beta), policy_chosen_logps=LOGPS.chosen_logps,
                           policy_rejected_logps=LOGPS.rejected_logps, reference_chosen_logps=REFERENCE[0],
                           reference_rejected_logps=REFERENCE[1], chosen_lengths=LOGPS.chosen_lengths,
                           rejected_lengths=LOGPS.rejected_lengths)
    metrics = PairMetrics(beta)
    metrics.add(out, LOGPS)
    return metrics.compute(prefix="eval_")


def _trl_formula(beta: float = BETA) -> dict[str, float]:
    """TRL 1.16 DPOTrainer._compute_loss's logged metrics, its lines written over our tensors."""
    chosen_logratios, rejected_logratios = LOGPS.chosen_logps - REFERENCE[0], LOGPS.rejected_logps - REFERENCE[1]
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": LOGPS.chosen_logps.mean().item(), "logps/rejected": LOGPS.rejected_logps.mean().item()}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "sigmoid_norm", "hinge", "apo_zero"])
def test_rewards_and_logps_are_trls_for_every_loss(loss):
    m = _metrics(loss)
    # Hand-worked: log-ratios (2, -3) chosen and (1, 0.5) rejected; β = 0.1.
    hand = {"rewards/chosen": 0.1 * (2 - 3) / 2, "rewards/rejected": 0.1 * (1 + 0.5) / 2,
            "rewards/margins": 0.1 * ((2 - 1) + (-3 - 0.5)) / 2, "rewards/accuracies": 0.5,
            "logps/chosen": (-10 - 9) / 2, "logps/rejected": (-5 - 7.5) / 2}
    trl = _trl_formula()
    for name, value in hand.items():
        assert m[f"eval_{name}"] == pytest.approx(value, abs=1e-6) == trl[name], name


@pytest.mark.parametrize("loss", ["ipo", "sigmoid_norm"])
def test_the_per_token_margin_the_averaging_losses_act_on_has_its_own_name(loss):
    m = _metrics(loss)
    # β(lr_c/len_c − lr_r/len_r): pair 1 0.1·(2/20 − 1/4) = −0.015, pair 2 0.1·(−3/6 − 0.5/5) = −0.06
    assert m[f"eval_{PER_TOKEN_METRIC}"] == pytest.approx((-0.015 - 0.06) / 2, abs=1e-7)
    assert m["eval_rewards/margins"] == pytest.approx((0.1 - 0.35) / 2, abs=1e-7)  # TRL's, on the sums


def test_summing_losses_log_no_per_token_margin_and_a_combined_loss_keeps_it():
    assert f"eval_{PER_TOKEN_METRIC}" not in _metrics("sigmoid")
    combined = _metrics("sigmoid,ipo")
    assert combined[f"eval_{PER_TOKEN_METRIC}"] == pytest.approx(-0.0375, abs=1e-7)
    assert combined["eval_rewards/chosen"] == pytest.approx(-0.05, abs=1e-7)


def test_reference_free_losses_report_per_token_rewards_and_summed_logps():
    # No reference, so no log-ratio: SimPO's implicit reward β·π/len (TRL's CPO and ORPO trainers' too).
    m = _metrics("simpo", beta=2.0)
    assert m["eval_rewards/chosen"] == pytest.approx(2.0 * (-10 / 20 - 9 / 6) / 2)
    assert m["eval_rewards/accuracies"] == 0.5  # pair 1: −0.5 > −1.25; pair 2: −1.5 < −1.5 per token
    assert m["eval_logps/chosen"] == pytest.approx(-9.5)  # the summed log-probs, as for every loss


def test_help_gives_the_alpha_mapping_to_the_f_dpo_paper():
    from dpokit.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    assert "the f-DPO paper's (and older TRL's) α is 1 − this α" in text
