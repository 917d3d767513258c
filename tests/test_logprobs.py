"""The log-prob path against a plain full-vocabulary log_softmax, and padding invariance."""

import torch

from dpokit.data.batching import collate_padded
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.model.logprobs import sequence_logps
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs


def _setup(n=6):
    tok = build_tokenizer("word")
    model = build_tiny_llama(tok, seed=3).eval()
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(n, seed=5))]
    pairs, _ = PairTokenizer(tok, max_length=64).tokenize(rows)
    return tok, model, pairs


def _naive(model, prompt, response):
    ids = torch.tensor([list(prompt + response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


def test_summed_logps_match_naive_computation():
    tok, model, pairs = _setup()
    with torch.no_grad():
        out = sequence_logps(model, collate_padded(pairs, tok.pad_token_id))
    for i, tp in enumerate(pairs):
        assert abs(out.chosen_logps[i].item() - _naive(model, tp.prompt_ids, tp.chosen_ids)) < 1e-4
        assert abs(out.rejected_logps[i].item() - _naive(model, tp.prompt_ids, tp.rejected_ids)) < 1e-4
        assert out.chosen_lengths[i].item() == len(tp.chosen_ids)
        assert out.rejected_lengths[i].item() == len(tp.rejected_ids)


def test_padding_does_not_change_a_pair_logps():
    tok, model, pairs = _setup()
    with torch.no_grad():
        together = sequence_logps(model, collate_padded(pairs, tok.pad_token_id))
        alone = [sequence_logps(model, collate_padded([tp], tok.pad_token_id)) for tp in pairs]
    for i, single in enumerate(alone):
        assert torch.allclose(together.chosen_logps[i], single.chosen_logps[0], atol=1e-5)
        assert torch.allclose(together.rejected_logps[i], single.rejected_logps[0], atol=1e-5)


def test_gradients_flow_only_through_response_tokens():
    """Catches: scoring prompt tokens too (batching.py's response range starting at 1, not at the
    prompt's end). The final hidden state at column t predicts token t + 1, so the summed log-probs
    have a gradient at exactly the columns that predict a response token, counted here by hand."""
    tok, model, pairs = _setup(2)
    batch = collate_padded(pairs, tok.pad_token_id)
    hidden = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        hidden["states"] = output

    handle = model.model.norm.register_forward_hook(keep)
    try:
        out = sequence_logps(model, batch)
    finally:
        handle.remove()
    (out.chosen_logps.sum() + out.rejected_logps.sum()).backward()
    sequences = [(tp.prompt_ids, tp.chosen_ids) for tp in pairs] + [(tp.prompt_ids, tp.rejected_ids) for tp in pairs]
    used = {(row, col) for row, (prompt, response) in enumerate(sequences)
            for col in range(len(prompt) - 1, len(prompt) + len(response) - 1)}  # response tokens' predictors
    grad = hidden["states"].grad.abs().sum(dim=-1)
    assert {tuple(rc) for rc in grad.nonzero().tolist()} == used
