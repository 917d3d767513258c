"""Tests written to kill mutants of model/logprobs.py that the suite let survive (benchmarks/mutation.py):
chunk sizing, WPO's log Σ p² on both head paths, the bf16 autocast path, empty inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpokit.model.logprobs import (
    CHUNK_ELEMENTS,
    MIN_CHUNK,
    _chunked_head_stats,
    _plain_token_stats,
    chunk_positions,
    chunked_head_logps,
    token_logps,
)


def test_chunk_positions_follow_the_vocabulary():
    assert chunk_positions(1000, chunk=7) == 7
    assert chunk_positions(1000) == CHUNK_ELEMENTS // 1000 == 4194
    assert chunk_positions(CHUNK_ELEMENTS) == MIN_CHUNK == 16  # one position's logits alone fill a block
    assert chunk_positions(0) == CHUNK_ELEMENTS


def _head(n=11, hidden=6, vocab=30, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden, dtype=dtype, generator=g), torch.randn(vocab, hidden, dtype=dtype, generator=g),
            torch.randn(vocab, dtype=dtype, generator=g), torch.randint(0, vocab, (n,), generator=g))


def test_log_sum_of_squared_probabilities_on_both_paths():
    h, w, b, targets = _head()
    logits = F.linear(h, w, b)
    expected = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)  # log Σ_v p(v)²
    expected_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (3, 4, 100):
        logps, squares = _chunked_head_stats(h, w, b, targets, chunk, log_sum_sq=True)
        torch.testing.assert_close(squares, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logps, expected_logps, rtol=1e-12, atol=1e-12)
        plain_logps, plain_squares = _plain_token_stats(logits, targets, chunk, log_sum_sq=True)
        torch.testing.assert_close(plain_squares, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(plain_logps, expected_logps, rtol=1e-12, atol=1e-12)
    assert _chunked_head_stats(h, w, b, targets, 4, log_sum_sq=False)[1] is None


def test_no_positions_give_empty_float32_results():
    logits = torch.zeros(0, 9)
    logps, squares = _plain_token_stats(logits, torch.zeros(0, dtype=torch.long), None, log_sum_sq=True)
    assert logps.shape == squares.shape == (0,) and logps.dtype == torch.float32
    assert token_logps(logits, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_bf16_autocast_path_matches_float32_within_bf16_rounding():
    h, w, b, targets = _head(dtype=torch.float32, seed=1)
    for with_bias in (b, None):
        leaves = [t.clone().requires_grad_() for t in (h, w, with_bias) if t is not None]
        ref = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_head_logps(leaves[0], leaves[1], leaves[2] if len(leaves) == 3 else None, targets, chunk=4)
        assert out.dtype == torch.float32
        expected = F.linear(ref[0], ref[1], ref[2] if len(ref) == 3 else None).log_softmax(-1)
        expected = expected.gather(-1, targets[:, None]).squeeze(-1)
        weights = torch.linspace(0.5, 1.5, len(targets))
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        # bf16 keeps 8 bits: logits of size ~|h||w| ~ 6 are off by ~6·2^-8 ≈ 0.03, so are log-probs and gradients
        torch.testing.assert_close(out, expected, atol=0.15, rtol=0.05)
        for got, want in zip(leaves, ref, strict=True):
            assert got.grad.dtype == want.dtype
            torch.testing.assert_close(got.grad, want.grad, atol=0.15 * (1 + want.grad.abs().max().item()), rtol=0.05)


@pytest.mark.parametrize("chunk", [1, 5])
def test_gradients_without_bias_and_for_hidden_only(chunk):
    h, w, _b, targets = _head()
    h.requires_grad_()
    out = chunked_head_logps(h, w, None, targets, chunk=chunk)
    out.sum().backward()
    ref_h = h.detach().clone().requires_grad_()
    F.linear(ref_h, w).log_softmax(-1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- which path a forward takes
def _tiny_batch(n=3):
    from dpokit.data.batching import collate_padded
    from dpokit.data.pairs import PreferencePair
    from dpokit.data.tokenize import PairTokenizer
    from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs

    tok = build_tokenizer("word")
    model = build_tiny_llama(tok, seed=3).eval()
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(n, seed=5))]
    pairs, _ = PairTokenizer(tok, max_length=64).tokenize(rows)
    return model, collate_padded(pairs, tok.pad_token_id)


def test_the_plain_path_scores_every_position_when_positions_outnumber_the_vocabulary():
    # 13 positions over a 4-token vocabulary, 2 at a time: a loop bounded by the wrong dimension
    # (the vocabulary) would stop after 4 of them.
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(13, 4, dtype=torch.float64, generator=g), torch.randint(0, 4, (13,), generator=g)
    expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (2, 5, None):
        torch.testing.assert_close(token_logps(logits, targets, chunk), expected, rtol=1e-12, atol=1e-12)


def test_chunked_head_none_takes_the_chunked_head_on_a_plain_head_model(monkeypatch):
    import dpokit.model.logprobs as logprobs

    model, batch = _tiny_batch()
    calls = []
    real = logprobs.ChunkedHeadLogps.apply
    monkeypatch.setattr(logprobs.ChunkedHeadLogps, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        auto = logprobs.sequence_logps(model, batch)  # chunked_head=None: the model's head is plain
        assert calls, "auto did not take the chunked head on a plain Linear head"
        calls.clear()
        plain = logprobs.sequence_logps(model, batch, chunked_head=False)
    assert not calls
    torch.testing.assert_close(auto.chosen_logps, plain.chosen_logps, rtol=1e-5, atol=1e-4)


def test_the_chunked_head_refuses_a_head_that_is_not_linear():
    from dpokit.model.logprobs import sequence_logps

    model, batch = _tiny_batch()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # the body is there; the head is no Linear
    with pytest.raises(ValueError, match="Linear output layer"), torch.no_grad():
        sequence_logps(model, batch, chunked_head=True)


def test_activations_go_to_cpu_only_for_an_offloaded_gradient_forward(monkeypatch):
    import contextlib

    from dpokit.model.capability import describe_forward
    from dpokit.model.logprobs import sequence_logps

    model, batch = _tiny_batch()
    used = []

    @contextlib.contextmanager
    def spy(pin_memory=False):
        used.append(pin_memory)
        yield

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    for offload, grad, expected in ((False, True, []), (True, False, []), (True, True, [True])):
        used.clear()
        forward = describe_forward(model, [], offload=offload)
        with torch.set_grad_enabled(grad):
            sequence_logps(model, batch, forward=forward)
        assert used == expected, (offload, grad)
