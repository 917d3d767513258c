"""WPO (Zhou et al. 2024): each pair's loss weighted by the policy's own aligned, length-normalised
probability of its two responses, computed in the log-prob reduction without gradient."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit import cli
from dpokit.config import LossConfig
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.losses import compile_loss
from dpokit.model.logprobs import sequence_logps, wpo_pair_weights
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs

ln = math.log


def test_weights_by_hand():
    # Sequences 0, 1 are the chosen halves of pairs 0, 1; 2, 3 their rejected halves. Tokens in
    # any order (packed rows interleave sequences). Per token: log p(y) − log Σ_v p(v)².
    #   seq 0: ln(.5/.25) = ln 2, ln(.5/(1/16)) = ln 8  -> mean ln 4 -> w = 4
    #   seq 2: ln(.25/.5) = ln(1/2)                      -> w = 1/2       pair 0: 4 · 1/2 = 2
    #   seq 1: ln(.1/.1) = 0                             -> w = 1
    #   seq 3: ln(.3/.1) three times                     -> w = 3         pair 1: 1 · 3 = 3
    rows = [(0, .5, .25), (2, .25, .5), (3, .3, .1), (0, .5, 1 / 16), (1, .1, .1), (3, .3, .1), (3, .3, .1)]
    score_seq = torch.tensor([r[0] for r in rows])
    logps = torch.tensor([ln(r[1]) for r in rows], dtype=torch.float64, requires_grad=True)
    log_sum_sq = torch.tensor([ln(r[2]) for r in rows], dtype=torch.float64)
    weights = wpo_pair_weights(logps, log_sum_sq, score_seq, torch.bincount(score_seq, minlength=4))
    torch.testing.assert_close(weights, torch.tensor([2.0, 3.0], dtype=torch.float64), rtol=1e-14, atol=0)
    assert not weights.requires_grad  # a weight, never a path for the gradient


def _halves(pi_c: float, pi_r: float, ref_c: float, ref_r: float, n: int = 1) -> dict[str, torch.Tensor]:
    t = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    return dict(policy_chosen_logps=t(pi_c).requires_grad_(True), policy_rejected_logps=t(pi_r).requires_grad_(True),
                reference_chosen_logps=t(ref_c), reference_rejected_logps=t(ref_r),
                chosen_lengths=t(4.0), rejected_lengths=t(4.0))


def test_weighted_loss_by_hand_every_term_scaled_rewards_not():
    # Δ = (−1 − −2) − (−3 − −2) = 2, β = 0.5: DPO −log σ(1) = ln(1 + e^−1); sft −π_c/len_c = 1/4.
    plan = compile_loss(LossConfig(loss=("sigmoid", "sft"), loss_weights=(1.0, 0.5), beta=0.5, wpo=True))
    weights = torch.tensor([2.0, 0.25], dtype=torch.float64)
    out = plan(**_halves(-1.0, -3.0, -2.0, -2.0, n=2), pair_weights=weights)
    unweighted = math.log1p(math.exp(-1.0)) + 0.5 * 0.25
    torch.testing.assert_close(out.losses, weights * unweighted, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.chosen_rewards, torch.full((2,), 0.5, dtype=torch.float64))  # β·lr_c, unweighted


def test_gradient_is_dpo_s_scaled_by_the_weight():
    """∂L/∂π_c = −w·β·σ(−βΔ) < 0 and ∂L/∂π_r = +w·β·σ(−βΔ): DPO's signs, w times as strong."""
    x = _halves(-1.0, -3.0, -2.0, -2.0)
    plan = compile_loss(LossConfig(loss=("sigmoid",), beta=0.5, wpo=True))
    plan(**x, pair_weights=torch.tensor([3.0], dtype=torch.float64)).losses.sum().backward()
    expected = 3.0 * 0.5 / (1 + math.exp(1.0))
    assert x["policy_chosen_logps"].grad.item() == pytest.approx(-expected, rel=1e-13)
    assert x["policy_rejected_logps"].grad.item() == pytest.approx(expected, rel=1e-13)


# ---------------------------------------------------------------------------------------------
# On a real model: every layout and both LM-head paths give the weights of a naive forward.


@pytest.fixture(scope="module")
def model_and_pairs():
    tok = build_tokenizer("word")
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(5, 7))]
    pairs, _ = PairTokenizer(tok, max_length=64).tokenize(rows)
    model = build_tiny_llama(tok, seed=3).double().eval()
    return model, pairs, tok.pad_token_id


def _naive_weight(model, prompt, response) -> float:
    """exp(mean over the response of log p(y_k) − log Σ_v p(v)²), from one unbatched fp64 forward."""
    ids = torch.tensor([list(prompt + response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    n = len(prompt)
    aligned = [logp[t - 1, ids[0, t]] - torch.logsumexp(2 * logp[t - 1], -1) for t in range(n, ids.shape[1])]
    return math.exp(float(sum(aligned)) / len(aligned))


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_naive_weights(model_and_pairs, layout, chunked):
    model, pairs, pad = model_and_pairs
    expected = torch.tensor([_naive_weight(model, p.prompt_ids, p.chosen_ids) * _naive_weight(model, p.prompt_ids,
                                                                                               p.rejected_ids)
                             for p in pairs], dtype=torch.float64)
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, pad, layout), chunked_head=chunked, chunk=5, wpo_weights=True)
    torch.testing.assert_close(out.pair_weights, expected, rtol=1e-10, atol=0)
    assert sequence_logps(model, collate(pairs, pad, layout), chunked_head=chunked).pair_weights is None  # off


# ---------------------------------------------------------------------------------------------
# Through the CLI


def _train(model_dir, data, out, *extra) -> int:
    return cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "32",
                     "--progress", "off", *extra])


def test_two_cli_steps_log_the_weights(tiny_model_dir, toy_data, tmp_path, capsys):
    assert _train(tiny_model_dir, toy_data[0], tmp_path / "run", "--wpo") == 0, capsys.readouterr().err
    first, second = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in (first, second):
        assert math.isfinite(record["wpo/pair_weight"]) and record["wpo/pair_weight"] > 0
    # Step 1: policy = reference, so every pair's DPO loss is ln 2 and the logged loss is ln 2
    # times the mean pair weight (float32 log-probs: ties only up to rounding).
    assert first["loss"] == pytest.approx(math.log(2) * first["wpo/pair_weight"], rel=1e-5)
    assert first["wpo/pair_weight"] != pytest.approx(1.0, abs=1e-3)  # the weights do weigh here
    assert "| wpo | True |" in (tmp_path / "run" / "README.md").read_text()  # the model card says so


def test_a_run_without_wpo_logs_no_weights(trained_run):
    assert "wpo/pair_weight" not in (trained_run / "metrics.jsonl").read_text()
    card = (trained_run / "README.md").read_text()
    assert "| wpo |" not in card and "| ld_alpha |" not in card and "| beta | 0.1 |" in card


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_wpo_with_a_batch_sorting_loss_is_one_line_error(loss, tiny_model_dir, toy_data, tmp_path, capsys):
    assert _train(tiny_model_dir, toy_data[0], tmp_path / "run", "--wpo", "--loss", loss) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--wpo" in err and f"--loss {loss}" in err, err


def test_the_docs_loss_table_has_rows_for_wpo_and_ld_alpha():
    text = (Path(__file__).parents[1] / "docs" / "losses.md").read_text(encoding="utf-8")
    section = text.split("## f-divergences", 1)[0]
    options = [row.split("|")[1].strip().split()[0] for row in section.splitlines()
               if row.startswith("| `--") and not row.startswith("| `--loss`")]  # the header names --loss
    assert options == ["`--wpo`", "`--ld-alpha`"]
