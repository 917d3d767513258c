"""Every batch layout, with and without the chunked LM head, gives the plain padded forward's
per-sequence log-probs and gradients (fp32, 1e-5), on a tiny Llama and on other architectures.

DPOKIT_TEST_DEVICE=cuda runs the equivalence tests on a GPU (benchmarks/gpu_check.sh)."""

import os

import pytest
import torch

from dpokit.data.batching import LAYOUTS, collate, pack_rows
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer, TokenizedPair
from dpokit.model.logprobs import chunked_head_logps, head_is_plain, sequence_logps, token_logps
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs


def _pairs(tok, n=6, seed=5):
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(n, seed))]
    pairs, _ = PairTokenizer(tok, max_length=64).tokenize(rows)
    return pairs


def _qwen2(tok, attn="sdpa"):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(11)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation=attn)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _gpt2(tok, attn="sdpa"):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(12)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _llama(tok, attn="sdpa"):
    model = build_tiny_llama(tok, seed=3)
    model.config._attn_implementation = attn
    return model


DEVICE = torch.device(os.environ.get("DPOKIT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for a 1e-5 comparison

ARCHS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def _run(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch.to(DEVICE), chunked_head=chunked, chunk=5)
    # A loss that weighs chosen and rejected differently, so a swapped half would show.
    (out.chosen_logps.sum() - 0.37 * out.rejected_logps.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_layout_matches_the_plain_padded_forward(arch, attn):
    tok = build_tokenizer("word")
    model = ARCHS[arch](tok, attn).to(DEVICE)
    assert model.config._attn_implementation == attn
    pairs = _pairs(tok)
    reference, ref_grads = _run(model, collate(pairs, tok.pad_token_id, "padded"), chunked=False)
    assert head_is_plain(model)
    for layout in LAYOUTS:
        for chunked in (False, True):
            out, grads = _run(model, collate(pairs, tok.pad_token_id, layout), chunked)
            where = f"{arch}/{attn}/{layout}/chunked={chunked}"
            torch.testing.assert_close(out.chosen_logps, reference.chosen_logps, atol=1e-5, rtol=0, msg=where)
            torch.testing.assert_close(out.rejected_logps, reference.rejected_logps, atol=1e-5, rtol=0, msg=where)
            assert torch.equal(out.chosen_lengths, reference.chosen_lengths), where
            assert torch.equal(out.rejected_lengths, reference.rejected_lengths), where
            assert grads.keys() == ref_grads.keys(), where
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{where} {name}")


def test_prefix_shared_rejected_never_sees_chosen():
    tok = build_tokenizer("word")
    model = _llama(tok).eval()
    pair = _pairs(tok, 1)[0]
    other = TokenizedPair(pair.prompt_ids, pair.chosen_ids[:-2] + pair.chosen_ids[-1:] * 2 + (7,),
                          pair.rejected_ids, pair.index)
    with torch.no_grad():
        a = sequence_logps(model, collate([pair], tok.pad_token_id, "prefix-shared"))
        b = sequence_logps(model, collate([other], tok.pad_token_id, "prefix-shared"))
    assert not torch.allclose(a.chosen_logps, b.chosen_logps)
    assert torch.equal(a.rejected_logps, b.rejected_logps)


def test_prefix_shared_positions_and_scoring_columns():
    pair = TokenizedPair((1, 10, 11), (20, 21), (30, 31, 32), 0)
    batch = collate([pair], pad_id=0, layout="prefix-shared")
    assert batch.input_ids.tolist() == [[1, 10, 11, 20, 21, 30, 31, 32]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    # chosen 20 and rejected 30 are both predicted from the last prompt token (column 2)
    assert batch.score_cols.tolist() == [2, 3, 2, 5, 6]
    assert batch.targets.tolist() == [20, 21, 30, 31, 32]
    assert batch.score_seq.tolist() == [0, 0, 1, 1, 1]
    assert batch.num_tokens == 8


def test_packing_is_first_fit_decreasing_and_never_overfills():
    assert pack_rows([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    assert pack_rows([9, 1], capacity=4) == [[0], [1]]  # capacity grows to the longest block
    pairs = [TokenizedPair((1, 2), (3,) * k, (4,) * (k + 1), k) for k in range(1, 7)]
    batch = collate(pairs, pad_id=0, layout="packed")
    assert batch.input_ids.shape[1] == 2 + 7  # the longest sequence
    assert batch.input_ids.shape[0] < 2 * len(pairs)
    assert batch.num_tokens == sum(2 * 2 + k + (k + 1) for k in range(1, 7))


def test_chunked_head_gradients_match_autograd_in_double():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    torch.autograd.gradcheck(lambda h, w, b: chunked_head_logps(h, w, b, targets, chunk=4), (hidden, weight, bias))
    plain = token_logps(torch.nn.functional.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(chunked_head_logps(hidden, weight, bias, targets, chunk=4), plain.double())


def test_models_that_post_process_logits_fall_back_to_the_plain_path():
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = build_tokenizer("word")
    torch.manual_seed(1)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                       max_position_embeddings=128, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert not head_is_plain(model)  # soft-capping happens after the head
    pairs = _pairs(tok, 3)
    with torch.no_grad():
        padded = sequence_logps(model, collate(pairs, tok.pad_token_id, "padded"))
        packed = sequence_logps(model, collate(pairs, tok.pad_token_id, "packed"))
        ids = torch.tensor([list(pairs[0].prompt_ids + pairs[0].chosen_ids)])
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    n = len(pairs[0].prompt_ids)
    naive = sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))
    assert abs(padded.chosen_logps[0].item() - naive) < 1e-4
    torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, atol=1e-5, rtol=0)
