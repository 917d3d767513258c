"""Property-based tests (hypothesis): invariants that example tests check only at a few points.

- layouts: padded, packed and prefix-shared give the same per-sequence log-probs for random pair
  lengths, random shared response prefixes and random pack capacities;
- tokenization: for random text (multi-byte characters included) the prompt/response boundary is
  exact or counted, BOS once, EOS once, and the ids decode back to exactly the texts;
- loss symmetries: swapping chosen and rejected changes each loss as its formula says;
- accumulation: the accumulated gradient of a step does not depend on how its pairs are split.

Deterministic (derandomize=True) and small (max_examples) so CI runs the same cases every time.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.config import LossConfig, SpeedConfig
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer, TokenizedPair
from dpokit.losses import preference_loss
from dpokit.model.logprobs import sequence_logps
from dpokit.scoring import PairScorer
from dpokit.train.distributed import Distributed
from dpokit.train.step import TrainingParts, _forward_backward
from helpers.toy import build_tiny_llama, build_tokenizer

FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("word")


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_llama(tok, seed=7, hidden=32, layers=2, heads=2).eval()


# --- layouts --------------------------------------------------------------------------------

def _token_lists(draw, n: int, low: int, high: int) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.integers(low, high), min_size=n, max_size=n)))


@st.composite
def pair_batches(draw, first_word: int, last_word: int, bos: int, eos: int) -> list[TokenizedPair]:
    """1-4 pairs: prompts of 0-6 words after BOS, responses of 1-6 tokens that may share a prefix
    of 0-3 tokens (what prefix sharing must not confuse with the prompt), ending in EOS or cut off."""
    pairs = []
    for i in range(draw(st.integers(1, 4))):
        prompt = (bos, *_token_lists(draw, draw(st.integers(0, 6)), first_word, last_word))
        common = _token_lists(draw, draw(st.integers(0, 3)), first_word, last_word)
        chosen = common + _token_lists(draw, draw(st.integers(1, 5)), first_word, last_word)
        rejected = common + _token_lists(draw, draw(st.integers(1, 5)), first_word, last_word)
        if draw(st.booleans()):
            chosen, rejected = (*chosen, eos), (*rejected, eos)
        pairs.append(TokenizedPair(prompt, chosen, rejected, i))
    return pairs


def test_layouts_agree_on_random_pairs(tok, model):
    words = range(len(tok) - 40, len(tok))  # ordinary word tokens, never special ones
    batches = pair_batches(words.start, words.stop - 1, tok.bos_token_id, tok.eos_token_id)

    @FAST
    @given(pairs=batches, pack_length=st.integers(0, 24), chunk=st.sampled_from([None, 3]))
    def check(pairs, pack_length, chunk):
        with torch.no_grad():
            padded = sequence_logps(model, collate(pairs, tok.pad_token_id, "padded"), chunked_head=False)
            for layout in LAYOUTS:
                out = sequence_logps(model, collate(pairs, tok.pad_token_id, layout, pack_length),
                                     chunked_head=chunk is not None, chunk=chunk)
                # fp32 sums of <= 10 log-probs of magnitude ~ln(vocab): 1e-5 is ~100 roundoffs of slack
                torch.testing.assert_close(out.chosen_logps, padded.chosen_logps, atol=1e-5, rtol=0, msg=layout)
                torch.testing.assert_close(out.rejected_logps, padded.rejected_logps, atol=1e-5, rtol=0, msg=layout)
                assert out.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs], layout
                assert out.rejected_lengths.tolist() == [len(p.rejected_ids) for p in pairs], layout

    check()


# --- tokenization boundaries ----------------------------------------------------------------

CORPUS = ["héllo wörld, the weather is lovely today", "日本語のテキスト and emoji 🙂 too", "naïve café ünïcode"] * 10
# Pieces of the corpus (so BPE merges can cross the prompt/response boundary) and any character.
PIECES = ["hel", "lo", " wör", "ld", "日本", "語", "の", "テ", "🙂", " ", "é", "na", "ïve", " the", "weather", ","]
TEXT = st.lists(st.sampled_from(PIECES) | st.characters(exclude_categories=("Cs",), exclude_characters="<>"),
                min_size=1, max_size=5).map("".join)


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer("bpe", corpus=CORPUS, vocab_size=320)


@settings(FAST, max_examples=40)
@given(prompt=TEXT, chosen=TEXT, rejected=TEXT)
def test_boundary_is_exact_or_counted_on_random_text(bpe_tok, prompt, chosen, rejected):
    if chosen == rejected:
        return
    enc = lambda s: bpe_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    (pair,), stats = PairTokenizer(bpe_tok, max_length=512).tokenize([PreferencePair(prompt, chosen, rejected, 1)])
    bos, eos = bpe_tok.bos_token_id, bpe_tok.eos_token_id
    assert pair.prompt_ids[0] == bos and bos not in pair.prompt_ids[1:] + pair.chosen_ids + pair.rejected_ids
    for ids, text in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
        assert ids[-1] == eos and eos not in ids[:-1]
        assert bpe_tok.decode(ids[:-1]) == text  # every byte of a multi-byte character on its side
    assert bpe_tok.decode(pair.prompt_ids[1:]) == prompt
    merged = [enc(prompt + text)[: len(enc(prompt))] != enc(prompt) for text in (chosen, rejected)]
    assert stats.boundary_merges == int(any(merged))
    for ids, text, cut in ((pair.chosen_ids, chosen, merged[0]), (pair.rejected_ids, rejected, merged[1])):
        if not cut:  # the boundary is exact: the ids are those of the full text, split at the prompt
            assert list(pair.prompt_ids[1:] + ids[:-1]) == enc(prompt + text)


# --- loss symmetries ------------------------------------------------------------------------

LOGP = st.floats(-40.0, -0.5)


@st.composite
def logps(draw):
    n = draw(st.integers(1, 5))
    column = lambda: torch.tensor(draw(st.lists(LOGP, min_size=n, max_size=n)), dtype=torch.float64)  # noqa: E731
    lengths = lambda: torch.tensor(draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)), dtype=torch.float64)  # noqa: E731
    return {"policy_chosen_logps": column(), "policy_rejected_logps": column(), "reference_chosen_logps": column(),
            "reference_rejected_logps": column(), "chosen_lengths": lengths(), "rejected_lengths": lengths()}


def _swapped(t):
    return {"policy_chosen_logps": t["policy_rejected_logps"], "policy_rejected_logps": t["policy_chosen_logps"],
            "reference_chosen_logps": t["reference_rejected_logps"],
            "reference_rejected_logps": t["reference_chosen_logps"],
            "chosen_lengths": t["rejected_lengths"], "rejected_lengths": t["chosen_lengths"]}


def _expected_change(name, t, beta, eps):
    """loss(swapped) − loss(original) per pair, from each loss's formula (logσ(z) − logσ(−z) = z)."""
    lr_c = t["policy_chosen_logps"] - t["reference_chosen_logps"]
    lr_r = t["policy_rejected_logps"] - t["reference_rejected_logps"]
    delta = lr_c - lr_r
    averaged = lr_c / t["chosen_lengths"] - lr_r / t["rejected_lengths"]
    policy_averaged = t["policy_chosen_logps"] / t["chosen_lengths"] - t["policy_rejected_logps"] / t["rejected_lengths"]
    return {
        "sigmoid": (1 - 2 * eps) * beta * delta,  # cDPO: ε ↔ 1 − ε
        "robust": beta * delta / (1 - 2 * eps),
        "ipo": 2 * averaged / beta,  # (−a − c)² − (a − c)² = 4ac, c = 1/(2β)
        "sigmoid_norm": beta * averaged,
        "sppo_hard": 2 * delta / beta,
        "bco_pair": beta * delta,
        "nca_pair": F.logsigmoid(beta * lr_c) - F.logsigmoid(beta * lr_r),
        "apo_down": torch.sigmoid(beta * lr_r) - torch.sigmoid(beta * lr_c) + 2 * torch.sigmoid(beta * delta) - 1,
        "rdpo": beta * delta + 0.3 * (t["chosen_lengths"] - t["rejected_lengths"]),
        "simpo": beta * policy_averaged,  # γ = 0
    }[name]


SYMMETRIC = ["sigmoid", "robust", "ipo", "sigmoid_norm", "sppo_hard", "bco_pair", "nca_pair", "apo_down", "rdpo",
             "simpo"]


@pytest.mark.parametrize("name", SYMMETRIC)
@FAST
@given(t=logps(), beta=st.floats(0.05, 2.0), eps=st.sampled_from([0.0, 0.1, 0.3]))
def test_swapping_chosen_and_rejected_changes_the_loss_as_the_formula_says(name, t, beta, eps):
    options = {"beta": beta, "rdpo_alpha": 0.3, "simpo_gamma": 0.0}
    if name in ("sigmoid", "robust"):
        options["label_smoothing"] = eps
    original = preference_loss(name, **t, **options)
    swapped = preference_loss(name, **_swapped(t), **options)
    expected = _expected_change(name, t, beta, eps if name in ("sigmoid", "robust") else 0.0)
    scale = 1.0 + original.losses.abs() + swapped.losses.abs()
    torch.testing.assert_close(swapped.losses - original.losses, expected, atol=1e-9 * scale.max().item(), rtol=1e-9)
    # rewards trade places
    torch.testing.assert_close(swapped.chosen_rewards, original.rejected_rewards, atol=0, rtol=0)
    torch.testing.assert_close(swapped.rejected_rewards, original.chosen_rewards, atol=0, rtol=0)


@FAST
@given(t=logps(), beta=st.floats(0.05, 2.0))
def test_apo_zero_and_hinge_sum_rules(t, beta):
    """apo_zero(x) + apo_zero(swapped) = 2; hinge: relu(1 − z) + relu(1 + z) = max(2, 1 + |z|)."""
    apo = [preference_loss("apo_zero", **s, beta=beta).losses for s in (t, _swapped(t))]
    torch.testing.assert_close(apo[0] + apo[1], torch.full_like(apo[0], 2.0), atol=1e-12, rtol=0)
    hinge = [preference_loss("hinge", **s, beta=beta).losses for s in (t, _swapped(t))]
    z = beta * ((t["policy_chosen_logps"] - t["reference_chosen_logps"])
                - (t["policy_rejected_logps"] - t["reference_rejected_logps"]))
    torch.testing.assert_close(hinge[0] + hinge[1], torch.clamp(1 + z.abs(), min=2.0), atol=1e-9, rtol=1e-12)


@FAST
@given(t=logps(), beta=st.floats(0.05, 2.0), eps=st.sampled_from([0.05, 0.2, 0.4]))
def test_exo_swapped_is_exo_with_flipped_smoothing(t, beta, eps):
    swapped = preference_loss("exo_pair", **_swapped(t), beta=beta, label_smoothing=eps).losses
    flipped = preference_loss("exo_pair", **t, beta=beta, label_smoothing=1 - eps).losses
    torch.testing.assert_close(swapped, flipped, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@FAST
@given(t=logps(), beta=st.floats(0.05, 2.0), eps=st.sampled_from([0.0, 0.2]))
def test_aot_swapped_mean_moves_by_the_mean_margin(name, t, beta, eps):
    """AOT sorts over the batch: swapping reverses and negates its deltas, so the batch mean moves by (1−2ε)β·mean Δ."""
    original = preference_loss(name, **t, beta=beta, label_smoothing=eps).losses.mean()
    swapped = preference_loss(name, **_swapped(t), beta=beta, label_smoothing=eps).losses.mean()
    delta = ((t["policy_chosen_logps"] - t["reference_chosen_logps"])
             - (t["policy_rejected_logps"] - t["reference_rejected_logps"])).mean()
    assert math.isclose(swapped - original, (1 - 2 * eps) * beta * delta, rel_tol=1e-9,
                        abs_tol=1e-9 * (1 + abs(original) + abs(swapped)))


# --- accumulation ---------------------------------------------------------------------------

def _accumulated_grads(model, tok, micro_batches, total):
    scorer = PairScorer(model, None, loss=LossConfig(loss=("simpo",)), speed=SpeedConfig(), dtype="float32",
                        pad_id=tok.pad_token_id, device=torch.device("cpu"), layouts=["padded"], chunked_head=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    parts = TrainingParts(model, optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                          list(model.parameters()))
    model.zero_grad(set_to_none=True)
    _scored, loss = _forward_backward(parts, scorer, micro_batches, micro_batches[0][0], total, Distributed())
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulation_is_invariant_to_the_micro_batch_split(tok, model):
    words = range(len(tok) - 40, len(tok))
    batches = pair_batches(words.start, words.stop - 1, tok.bos_token_id, tok.eos_token_id)
    whole_cache = {}

    @settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @given(pairs=batches, cuts=st.lists(st.booleans(), min_size=3, max_size=3))
    def check(pairs, cuts):
        key = tuple(pairs)
        if key not in whole_cache:
            whole_cache[key] = _accumulated_grads(model, tok, [pairs], len(pairs))
        loss, grads = whole_cache[key]
        micro, current = [], [pairs[0]]
        for pair, cut in zip(pairs[1:], cuts, strict=False):
            if cut:
                micro.append(current)
                current = []
            current.append(pair)
        micro.append(current)
        split_loss, split_grads = _accumulated_grads(model, tok, micro, len(pairs))
        # Sums of a handful of fp32 terms in another order: relative error ~1e-6 of the largest term.
        torch.testing.assert_close(split_loss, loss, atol=1e-5, rtol=1e-5)
        for a, b in zip(split_grads, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5 * (1 + b.abs().max().item()), rtol=1e-4)

    check()
