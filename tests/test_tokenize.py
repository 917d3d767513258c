"""Tokenization rules: BOS once, EOS once, exact prompt/response boundary, documented truncation."""

import pytest

from dpokit.data.batching import collate, collate_padded
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from helpers.toy import build_tokenizer

CORPUS = [
    "hello world, the weather is lovely today and the world says hello back",
    "the cat sat on the mat; the dog sat on the log",
    "preference optimization trains a policy from pairs of responses",
] * 20


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer("word")


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer("bpe", corpus=CORPUS, vocab_size=320)


def _pair(prompt, chosen, rejected, index=1):
    return PreferencePair(prompt, chosen, rejected, index)


def test_bos_once_eos_once_and_boundary(word_tok):
    pt = PairTokenizer(word_tok, max_length=64)
    [tp], stats = pt.tokenize([_pair("the film was", " great fun", " dull")])
    bos, eos = word_tok.bos_token_id, word_tok.eos_token_id
    ids = lambda s: word_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert list(tp.prompt_ids) == [bos, *ids("the film was")]
    assert list(tp.chosen_ids) == [*ids("great fun"), eos]
    assert list(tp.rejected_ids) == [*ids("dull"), eos]
    assert stats.kept == 1 and stats.boundary_merges == 0


def test_special_tokens_already_in_text_are_not_doubled(word_tok):
    pt = PairTokenizer(word_tok, max_length=64)
    [tp], _ = pt.tokenize([_pair("<s> the film was", " great </s>", " dull </s></s>")])
    bos, eos = word_tok.bos_token_id, word_tok.eos_token_id
    for seq in (tp.prompt_ids + tp.chosen_ids, tp.prompt_ids + tp.rejected_ids):
        assert seq.count(bos) == 1 and seq[0] == bos
        assert seq.count(eos) == 1 and seq[-1] == eos


def test_scored_columns_are_exactly_the_ones_predicting_response_tokens(word_tok):
    """Catches: an off-by-one in the predicting column (batching.py's `col` -> `col - 1`). Reads the
    scoring spec `model/logprobs.py` reads (score_rows, score_cols, targets, score_seq): the hidden
    state at column t predicts token t + 1, so each response token is predicted from the column
    holding the token before it, for every layout."""
    pt = PairTokenizer(word_tok, max_length=64)
    pairs, _ = pt.tokenize([_pair("the film was", " great", " dull and flat"), _pair("the plot", " fun", " bleak")])
    batch = collate_padded(pairs, pad_id=word_tok.pad_token_id)
    assert batch.input_ids.shape == (4, 1 + 3 + 4)  # widest row: BOS + 3 prompt + 3 response + EOS
    # Padded, by hand: rows are chosen 0, chosen 1, rejected 0, rejected 1; pair 0's prompt is
    # BOS + 3 words, pair 1's BOS + 2 words.
    expected = [(0, 3), (0, 4),                   # "great" </s> after "<s> the film was"
                (1, 2), (1, 3),                   # "fun" </s> after "<s> the plot"
                (2, 3), (2, 4), (2, 5), (2, 6),   # "dull and flat" </s>
                (3, 2), (3, 3)]                   # "bleak" </s>
    assert list(zip(batch.score_rows.tolist(), batch.score_cols.tolist(), strict=True)) == expected
    assert batch.score_seq.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    for layout in ("padded", "packed", "prefix-shared"):
        batch = collate(pairs, word_tok.pad_token_id, layout)
        sequences = [tp.prompt_ids + tp.chosen_ids for tp in pairs] + [tp.prompt_ids + tp.rejected_ids for tp in pairs]
        for seq, full in enumerate(sequences):
            picked = (batch.score_seq == seq).nonzero().flatten().tolist()
            n_prompt = len(pairs[seq % 2].prompt_ids)
            assert batch.targets[picked].tolist() == list(full[n_prompt:]), layout
            for k, n in enumerate(picked, start=n_prompt):  # token k of the sequence, predicted from k - 1
                row, col = batch.score_rows[n].item(), batch.score_cols[n].item()
                assert batch.input_ids[row, col].item() == full[k - 1], (layout, seq, k)
                if batch.position_ids is not None:
                    assert batch.position_ids[row, col].item() == k - 1, (layout, seq, k)


def test_bpe_boundary_is_exact_or_counted(bpe_tok):
    pt = PairTokenizer(bpe_tok, max_length=128)
    # " world" after "hello" tokenizes the same alone and in context: no merge.
    # "hel" + "lo world" merges across the boundary: counted, prompt keeps its own tokens.
    pairs = [_pair("hello", " world", " there"), _pair("hel", "lo world", "lo there", index=2)]
    out, stats = pt.tokenize(pairs)
    enc = lambda s: bpe_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    clean, merged = out
    assert list(clean.prompt_ids[1:] + clean.chosen_ids[:-1]) == enc("hello world")
    assert list(merged.prompt_ids[1:]) == enc("hel")
    assert list(merged.chosen_ids[:-1]) == enc("lo world")
    assert stats.boundary_merges == 1
    assert enc("hello world")[: len(enc("hel"))] != enc("hel")  # the premise of the second pair


def test_no_bos_for_tokenizers_that_do_not_add_one(word_tok):
    from transformers import PreTrainedTokenizerFast

    gpt2_style = PreTrainedTokenizerFast(tokenizer_object=word_tok.backend_tokenizer.__class__.from_str(
        word_tok.backend_tokenizer.to_str()), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    gpt2_style.backend_tokenizer.post_processor = None
    [tp], _ = PairTokenizer(gpt2_style, max_length=64).tokenize([_pair("the film", " great", " dull")])
    assert gpt2_style.bos_token_id not in tp.prompt_ids


def test_truncation_rules_and_counts(word_tok):
    long_prompt = " ".join(["the film was"] * 6)  # 18 words
    pairs = [
        _pair("the film", " great fun", " dull"),  # fits
        _pair(long_prompt, " great fun and warm", " dull", index=2),  # prompt cut, then fits
        _pair("the film", " " + " ".join(["great"] * 30), " dull", index=3),  # response cut
        _pair(long_prompt, " great", " dull", index=4),  # dropped without max_prompt_length
        _pair("the film", " great", " great", index=5),  # identical: dropped
    ]
    pt = PairTokenizer(word_tok, max_length=16, max_prompt_length=8)
    out, stats = pt.tokenize(pairs)
    assert [tp.index for tp in out] == [1, 2, 3, 4]
    cut_prompt = out[1]
    assert len(cut_prompt.prompt_ids) == 8 and cut_prompt.prompt_ids[0] == word_tok.bos_token_id
    assert word_tok.decode(cut_prompt.prompt_ids[1:]).split() == long_prompt.split()[-7:]  # kept the end
    cut_resp = out[2]
    assert len(cut_resp.prompt_ids) + len(cut_resp.chosen_ids) == 16
    assert cut_resp.chosen_ids[-1] != word_tok.eos_token_id  # a cut response did not end
    assert out[3].rejected_ids[-1] == word_tok.eos_token_id  # fits after the prompt cut: EOS kept
    assert stats.prompts_cut == 2 and stats.responses_cut == 1 and stats.dropped_identical == 1

    no_prompt_cut = PairTokenizer(word_tok, max_length=16, min_response_share=0)  # asked to drop
    out, stats = no_prompt_cut.tokenize(pairs[3:4])
    assert out == [] and stats.dropped_prompt_too_long == 1 and stats.dropped_rows == [4]


def test_by_default_long_prompts_are_cut_so_no_pair_is_lost(word_tok):
    long_prompt = " ".join(["the film was"] * 6)  # 18 words + BOS = 19 tokens
    long_response = " " + " ".join(["great"] * 10)  # 10 words + EOS = 11 tokens
    pairs = [_pair(long_prompt, " great", " dull", index=1),  # the prompt alone fills --max-length 16
             _pair(long_prompt, long_response, " dull", index=2),
             _pair("the film", " " + " ".join(["great"] * 15), " dull", index=3)]  # short prompt: response cut
    out, stats = PairTokenizer(word_tok, max_length=16).tokenize(pairs)
    assert [tp.index for tp in out] == [1, 2, 3] and stats.dropped_prompt_too_long == 0
    short, cut = out[0], out[1]
    # Responses of 2 tokens keep all of them: the prompt is cut to 16 - 2 from the left, BOS kept.
    assert len(short.prompt_ids) == 14 and short.prompt_ids[0] == word_tok.bos_token_id
    assert short.chosen_ids[-1] == word_tok.eos_token_id
    assert word_tok.decode(short.prompt_ids[1:]).split() == long_prompt.split()[-13:]
    # An 11-token response keeps ceil(0.25 x 16) = 4 tokens: the prompt gets 12.
    assert len(cut.prompt_ids) == 12 and len(cut.chosen_ids) == 4
    assert len(out[2].prompt_ids) == 3 and len(out[2].chosen_ids) == 13
    assert (stats.prompts_cut, stats.responses_cut, stats.rows_cut) == (2, 2, 3)


def test_rows_longer_than_limit_never_exceed_it(word_tok):
    pt = PairTokenizer(word_tok, max_length=10, max_prompt_length=4)
    text = " ".join(["great"] * 20)
    [tp], _ = pt.tokenize([_pair(text, " " + text, " dull")])
    assert len(tp.prompt_ids) + len(tp.chosen_ids) <= 10
    assert len(tp.prompt_ids) + len(tp.rejected_ids) <= 10


def test_min_response_share_is_checked():
    from dpokit.config import DataConfig, validate_data
    from dpokit.errors import DpokitError

    for bad in (-0.1, 1.0):
        with pytest.raises(DpokitError, match=r"--min-response-share must be in \[0, 1\)"):
            validate_data(DataConfig(data="d.jsonl", min_response_share=bad))
