"""LD-DPO (Liu et al. 2024): response tokens past the pair's shorter response count α times, in the
policy and the reference log-probs alike, in the one log-prob reduction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from dpokit import cli
from dpokit.config import LossConfig
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.losses import compile_loss
from dpokit.model.logprobs import PairLogps, response_sums, sequence_logps
from dpokit.model.reference import cache_path, precompute_reference, reference_fingerprint
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs

# One pair (sequence 0 = chosen, 1 = rejected), tokens interleaved as a packed row may list them.
# Chosen tokens −1, −2, −3 (3 tokens), rejected −4, −5 (2): ℓ = min(3, 2) = 2, so only the
# chosen's third token is past the shorter response.
SCORE_SEQ = torch.tensor([1, 0, 0, 1, 0])
POLICY_TOKENS = [-4.0, -1.0, -2.0, -5.0, -3.0]
REFERENCE_TOKENS = [-4.0, -1.5, -1.5, -4.0, -1.5]
COUNTS = torch.bincount(SCORE_SEQ, minlength=2)


def _sums(tokens, alpha):
    return response_sums(torch.tensor(tokens, dtype=torch.float64), SCORE_SEQ, COUNTS, alpha)


def test_sums_by_hand():
    # α = 0.5: chosen −1 − 2 + 0.5·(−3) = −4.5; rejected −4 − 5 = −9 (nothing past ℓ)
    assert _sums(POLICY_TOKENS, 0.5).tolist() == [-4.5, -9.0]
    assert _sums(POLICY_TOKENS, 0.0).tolist() == [-3.0, -9.0]  # α = 0: cut at the shorter length
    assert _sums(POLICY_TOKENS, 1.0).tolist() == [-6.0, -9.0] == _sums(POLICY_TOKENS, None).tolist()  # α = 1: DPO


def test_ld_dpo_loss_by_hand():
    # α = 0.5: π_c = −4.5, ref_c = −1.5 − 1.5 + 0.5·(−1.5) = −3.75, lr_c = −0.75;
    # π_r = −9, ref_r = −8, lr_r = −1; Δ = 0.25; β = 0.1: −log σ(0.025) = ln(1 + e^−0.025)
    pol, ref = _sums(POLICY_TOKENS, 0.5), _sums(REFERENCE_TOKENS, 0.5)
    out = compile_loss(LossConfig(beta=0.1, ld_alpha=0.5))(
        policy_chosen_logps=pol[:1], policy_rejected_logps=pol[1:], reference_chosen_logps=ref[:1],
        reference_rejected_logps=ref[1:], chosen_lengths=COUNTS[:1].double(), rejected_lengths=COUNTS[1:].double())
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.025)), rel=1e-14)


def test_tokens_past_the_shorter_response_get_alpha_times_the_gradient():
    """∂L/∂log p(y_k) = −βσ(−βΔ) on every chosen token up to ℓ, α times that past it (same sign),
    +βσ(−βΔ) on the rejected tokens."""
    tokens = torch.tensor(POLICY_TOKENS, dtype=torch.float64, requires_grad=True)
    pol = response_sums(tokens, SCORE_SEQ, COUNTS, 0.5)
    ref = _sums(REFERENCE_TOKENS, 0.5)
    dpo = compile_loss(LossConfig(beta=0.1, ld_alpha=0.5))
    dpo(policy_chosen_logps=pol[:1], policy_rejected_logps=pol[1:], reference_chosen_logps=ref[:1],
        reference_rejected_logps=ref[1:], chosen_lengths=None, rejected_lengths=None).losses.sum().backward()
    g = 0.1 / (1 + math.exp(0.025))
    torch.testing.assert_close(tokens.grad, torch.tensor([g, -g, -g, g, -0.5 * g], dtype=torch.float64),
                               rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# On a real model: every layout and both LM-head paths give the sums of a naive forward.


@pytest.fixture(scope="module")
def model_and_pairs():
    tok = build_tokenizer("word")
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(5, 7))]
    pairs, _ = PairTokenizer(tok, max_length=64).tokenize(rows)
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)  # there is a tail to weigh
    return build_tiny_llama(tok, seed=3).double().eval(), pairs, tok.pad_token_id


def _naive_sum(model, prompt, response, shared: int, alpha: float) -> float:
    """Σ_{k < ℓ} log p(y_k) + α Σ_{k ≥ ℓ} log p(y_k), from one unbatched fp64 forward."""
    ids = torch.tensor([list(prompt + response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    n = len(prompt)
    return sum((1.0 if k < shared else alpha) * float(logp[n + k - 1, ids[0, n + k]]) for k in range(len(response)))


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_naive_sums(model_and_pairs, layout, chunked):
    model, pairs, pad = model_and_pairs
    alpha = 0.3
    shared = [min(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    chosen = [_naive_sum(model, p.prompt_ids, p.chosen_ids, s, alpha) for p, s in zip(pairs, shared, strict=True)]
    rejected = [_naive_sum(model, p.prompt_ids, p.rejected_ids, s, alpha) for p, s in zip(pairs, shared, strict=True)]
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, pad, layout), chunked_head=chunked, chunk=5, ld_alpha=alpha)
    torch.testing.assert_close(out.chosen_logps, torch.tensor(chosen, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.rejected_logps, torch.tensor(rejected, dtype=torch.float64), rtol=1e-10,
                               atol=1e-10)
    # The lengths stay the full token counts (IPO-style averaging and metrics read them)
    assert out.chosen_lengths.tolist() == [float(len(p.chosen_ids)) for p in pairs]


# ---------------------------------------------------------------------------------------------
# The precomputed reference cache is keyed on α


def test_cache_key_holds_alpha_and_is_unchanged_without_it():
    base = reference_fingerprint("w", "fp32", attention="sdpa")
    assert "ld_alpha" not in base  # caches made before LD-DPO existed stay valid for runs without it
    keys = {repr(a): reference_fingerprint("w", "fp32", attention="sdpa", ld_alpha=a) for a in (0.5, 0.3, 1.0, 0.0)}
    assert len({json.dumps(k, sort_keys=True) for k in [base, *keys.values()]}) == 5


def test_a_cache_made_at_another_alpha_or_without_ld_never_matches(model_and_pairs, tmp_path):
    model, pairs, pad = model_and_pairs
    computed = []

    def compute_at(alpha):
        def compute(batch_pairs) -> PairLogps:
            computed.append((alpha, len(batch_pairs)))
            with torch.no_grad():
                return sequence_logps(model, collate(batch_pairs, pad, "padded"), ld_alpha=alpha)
        return compute

    def run(alpha):
        fingerprint = reference_fingerprint("w", "fp64", ld_alpha=alpha)
        return precompute_reference(compute_at(alpha), [pairs], fingerprint, tmp_path, 8, log=lambda _: None)

    first = run(0.5)
    assert computed == [(0.5, len(pairs))]
    again = run(0.5)  # same α: reused, nothing computed
    assert computed == [(0.5, len(pairs))]
    torch.testing.assert_close(again.lookup(pairs, torch.device("cpu")), first.lookup(pairs, torch.device("cpu")))
    other, plain = run(0.3), run(None)  # another α, and no LD-DPO: each computed afresh
    assert computed == [(0.5, len(pairs)), (0.3, len(pairs)), (None, len(pairs))]
    assert len(list(tmp_path.glob("reference-logps-*.safetensors"))) == 3
    lookups = [r.lookup(pairs, torch.device("cpu"))[0] for r in (first, other, plain)]
    assert not torch.equal(lookups[0], lookups[1]) and not torch.equal(lookups[0], lookups[2])


# ---------------------------------------------------------------------------------------------
# Through the CLI


def _train(model_dir, data, out, *extra) -> int:
    return cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "32",
                     "--progress", "off", *extra])


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_two_cli_steps(reference, tiny_model_dir, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = _train(tiny_model_dir, toy_data[0], out, "--ld-alpha", "0.5", "--reference", reference)
    assert code == 0, capsys.readouterr().err
    first, second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy = reference, both LD-weighted alike, so every pair's loss is ln 2 (a reference
    # summed without α would leave lr ≠ 0 wherever responses differ in length)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-5) and math.isfinite(second["loss"])
    assert "| ld_alpha | 0.5 |" in (out / "README.md").read_text()  # the model card says so
    if reference == "live":
        return
    (cache,) = (out / "reference-cache").glob("*.safetensors")
    with safe_open(str(cache), framework="pt") as handle:
        fingerprint = json.loads(handle.metadata()["fingerprint"])
    assert fingerprint["ld_alpha"] == "0.5" and cache == cache_path(cache.parent, fingerprint)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--ld-alpha", "1.5"], "--ld-alpha must be in [0, 1]"),
    (["--ld-alpha", "-0.1"], "--ld-alpha must be in [0, 1]"),
    (["--ld-alpha", "0.5", "--loss", "simpo"], "--loss simpo"),
    (["--ld-alpha", "0.5", "--loss", "sigmoid,sft"], "--loss sft"),
    (["--ld-alpha", "0.5", "--loss", "ipo"], "--loss ipo"),
])
def test_bad_ld_settings_are_one_line_errors(extra, fragment, tiny_model_dir, toy_data, tmp_path, capsys):
    assert _train(tiny_model_dir, toy_data[0], tmp_path / "run", *extra) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "--ld-alpha" in err, err
