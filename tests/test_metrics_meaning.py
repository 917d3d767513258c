"""Metrics under TRL's names mean what TRL's mean: rewards/* and logps/* on the log-probs the loss
sees (length-averaged for IPO and the other averaging losses); the α of the α-divergence."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import LossConfig
from dpokit.losses import loss_from_config
from dpokit.metrics import PairMetrics
from dpokit.model.logprobs import PairLogps

# One pair: chosen gains 2 nats over 20 tokens (0.1 per token), rejected 1 nat over 4 (0.25 per
# token). Summed, chosen wins (reward 0.2 > 0.1); per token - what IPO optimises - it loses.
LOGPS = PairLogps(chosen_logps=torch.tensor([-10.0]), rejected_logps=torch.tensor([-5.0]),
                  chosen_lengths=torch.tensor([20.0]), rejected_lengths=torch.tensor([4.0]))
REFERENCE = (torch.tensor([-12.0]), torch.tensor([-6.0]))


def _metrics(loss: str, beta: float = 0.1) -> dict[str, float]:
    out = loss_from_config(LossConfig(loss=loss, beta=beta), policy_chosen_logps=LOGPS.chosen_logps,
                           policy_rejected_logps=LOGPS.rejected_logps, reference_chosen_logps=REFERENCE[0],
                           reference_rejected_logps=REFERENCE[1], chosen_lengths=LOGPS.chosen_lengths,
                           rejected_lengths=LOGPS.rejected_lengths)
    metrics = PairMetrics()
    metrics.add(out, LOGPS)
    return metrics.compute()


@pytest.mark.parametrize("loss", ["ipo", "sigmoid_norm"])
def test_averaging_losses_report_what_the_loss_sees(loss):
    m = _metrics(loss)
    assert m["rewards/accuracies"] == 0.0  # TRL's IPO: 0, as the per-token gap is -0.15
    assert m["rewards/chosen"] == pytest.approx(0.1 * 2 / 20)
    assert m["rewards/rejected"] == pytest.approx(0.1 * 1 / 4)
    assert m["rewards/margins"] == pytest.approx(0.1 * (0.1 - 0.25))
    assert m["logps/chosen"] == pytest.approx(-10 / 20) and m["logps/rejected"] == pytest.approx(-5 / 4)


def test_summing_losses_report_sums():
    m = _metrics("sigmoid")
    assert m["rewards/accuracies"] == 1.0
    assert m["rewards/chosen"] == pytest.approx(0.2) and m["logps/chosen"] == pytest.approx(-10.0)


def test_reference_free_losses_report_averaged_logps():
    m = _metrics("simpo", beta=2.0)
    assert m["rewards/chosen"] == pytest.approx(2.0 * -10 / 20) and m["logps/chosen"] == pytest.approx(-10 / 20)


def test_help_gives_the_alpha_mapping_to_the_f_dpo_paper():
    from dpokit.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    assert "the f-DPO paper's (and older TRL's) α is 1 − this α" in text
