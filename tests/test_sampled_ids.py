"""Pairs built from samples train on the token ids that were sampled (issue 28, finding 3): not on
their decoded text tokenized again, which changes a response cut inside a multi-byte character
and replaces a generation-config stop token with the tokenizer's EOS."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.config import SamplingConfig
from dpokit.data import read_pairs
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import Sampler
from dpokit.eval.sampling import Completion
from dpokit.experiments.demo.tokenizer import train_bpe_tokenizer
from dpokit.experiments.online import preference_pairs, sample_preference_pairs, write_pairs
from helpers.toy import build_tiny_llama, build_tokenizer, write_jsonl


def _longest_first(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge that ranks by length (ties broken by order), so every prompt gives pairs."""
    return [len(r) + 0.001 * i for i, r in enumerate(responses)]


def _trained_against_sampled(tokenizer, model, prompts, sampling, tmp_path):
    """(the sampled ids of each text, the rows kept and the pairs training gets) for pairs built the online way."""
    sampler = Sampler(tokenizer, sampling, judge=_longest_first)
    sampled: dict[str, set] = {}  # two samples may decode to one text (a different stop token, say)
    for per in sampler.draw(model, prompts).completions:
        for c in per:
            sampled.setdefault(c.text, set()).add((c.prompt_ids, c.response_ids))
    rows, _ = sample_preference_pairs(model, prompts, sampler, pairing="all")
    path = write_pairs(tmp_path / "pairs.jsonl", rows)
    pairs, _ = PairTokenizer(tokenizer, max_length=256).tokenize(read_pairs(str(path)))
    assert len(pairs) >= len(rows) / 2  # a sample that is only its stop token is an empty response, skipped
    return sampled, [rows[pair.index - 1] for pair in pairs], pairs


def test_a_sample_cut_inside_a_character_trains_on_exactly_the_sampled_ids(tmp_path):
    # Byte-level tokenizer with no merges: a random model samples bytes that are often not UTF-8,
    # and a response cut at --max-new-tokens ends inside a character; both decode to U+FFFD.
    tokenizer = train_bpe_tokenizer(["the film was great café"], vocab_size=260)
    model = build_tiny_llama(tokenizer, seed=0)
    sampling = SamplingConfig(num_samples=4, max_new_tokens=6, sample_seed=3)
    sampled, rows, pairs = _trained_against_sampled(tokenizer, model, ["the film was", "great"], sampling, tmp_path)
    assert sum("\ufffd" in row["chosen"] + row["rejected"] for row in rows) >= 3  # the case is exercised
    for row, pair in zip(rows, pairs, strict=True):
        assert (pair.prompt_ids, pair.chosen_ids) in sampled[row["chosen"]]
        assert (pair.prompt_ids, pair.rejected_ids) in sampled[row["rejected"]]


def test_the_issue_case_great_cafe_cut_after_its_first_byte(tmp_path):
    tokenizer = train_bpe_tokenizer(["the film was great café"], vocab_size=260)  # bytes, no merges
    prompt_ids = [tokenizer.bos_token_id, *tokenizer("the film was", add_special_tokens=False)["input_ids"]]
    cut = tokenizer(" great café", add_special_tokens=False)["input_ids"][:-1]  # ends inside "é"
    assert tokenizer.decode(cut) == " great caf\ufffd"
    texts = [tokenizer.decode(cut), " film"]
    completions = [Completion(text, tuple(prompt_ids), tuple(ids), finished)
                   for text, ids, finished in ((texts[0], cut, False),
                                               (texts[1], [*tokenizer(" film", add_special_tokens=False)["input_ids"],
                                                           tokenizer.eos_token_id], True))]
    rows, _ = preference_pairs(["the film was"], [texts], [[1.0, 0.0]], "best_worst", [[False, True]],
                               sampled=[completions])
    [pair], _ = PairTokenizer(tokenizer, max_length=64).tokenize(read_pairs(str(write_pairs(tmp_path / "p.jsonl",
                                                                                            rows))))
    assert list(pair.chosen_ids) == cut
    # What the text round trip trained on before: the 3 bytes of U+FFFD in place of the sampled byte 0xC3.
    assert tokenizer(texts[0], add_special_tokens=False)["input_ids"] == [*cut[:-1], *tokenizer("\ufffd")["input_ids"][1:]]


def test_a_sample_ended_by_a_generation_config_eos_trains_on_that_token(tmp_path):
    tokenizer = build_tokenizer("word")
    tokenizer.add_tokens(["<|end|>"], special_tokens=True)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    model = build_tiny_llama(tokenizer, seed=0)
    bias = torch.zeros(len(tokenizer))  # <|end|> ends about 1 sample in 5 at each token; EOS is never sampled
    bias[end], bias[tokenizer.eos_token_id] = 2.5, -30.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    model.generation_config.eos_token_id = [end]  # a chat model's turn end, not the tokenizer's EOS
    sampling = SamplingConfig(num_samples=4, max_new_tokens=8, sample_seed=0)
    prompts = ["the film was", "the plot", "my friend", "the music"]
    sampled, rows, pairs = _trained_against_sampled(tokenizer, model, prompts, sampling, tmp_path)
    ended_by_end = 0
    for row, pair in zip(rows, pairs, strict=True):
        for text, ids in ((row["chosen"], pair.chosen_ids), (row["rejected"], pair.rejected_ids)):
            assert (pair.prompt_ids, ids) in sampled[text]
            ended_by_end += ids[-1] == end
            assert tokenizer.eos_token_id not in ids  # never sampled, so never trained
    assert ended_by_end >= 3


# --- the checks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word():
    return build_tokenizer("word")


def _row(tok, **changes):
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    row = {"prompt": "the film", "chosen": " was great", "rejected": " was dull",
           "prompt_ids": [tok.bos_token_id, *ids("the film")], "chosen_ids": [*ids(" was great"), tok.eos_token_id],
           "rejected_ids": ids(" was dull"), "rejected_finished": False}
    return {**row, **changes}


def _tokenize(tok, tmp_path, rows, strict=False):
    return PairTokenizer(tok, 64, strict=strict).tokenize(read_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows))))


def test_ids_that_are_the_rows_own_are_used_and_not_kept_as_extra_columns(word, tmp_path):
    row = _row(word)
    [pair] = list(read_pairs(str(write_jsonl(tmp_path / "r.jsonl", [row]))))
    assert pair.extra == {} and pair.sampled_ids.chosen == tuple(row["chosen_ids"])
    [tokenized], stats = _tokenize(word, tmp_path, [row, {k: v for k, v in row.items() if k != "prompt_ids"}][:1])
    assert list(tokenized.chosen_ids) == row["chosen_ids"] and list(tokenized.rejected_ids) == row["rejected_ids"]
    assert list(tokenized.prompt_ids) == row["prompt_ids"] and stats.kept == 1


def test_ids_that_are_not_the_rows_are_skipped_naming_the_field(word, tmp_path):
    eos = word.eos_token_id
    rows = [_row(word, chosen=" was lovely"),  # text edited after sampling
            _row(word, prompt_ids=[word.bos_token_id, 5]),  # another tokenizer or template
            _row(word, chosen_ids=[10**6, eos]),  # beyond the vocabulary
            _row(word)]  # kept, and in order after the others
    pairs, stats = _tokenize(word, tmp_path, rows)
    assert [p.index for p in pairs] == [4] and stats.skipped["sampled_ids_mismatch"] == [1, 2, 3]
    assert "'chosen_ids' does not decode to the text of 'chosen'" in stats.examples["sampled_ids_mismatch"]
    with pytest.raises(DpokitError, match=r"row 1: field 'chosen_ids' does not decode .*\(--strict\)"):
        _tokenize(word, tmp_path, rows[:1], strict=True)


def test_chat_rows_check_the_assistant_messages_text(tmp_path):
    chat = build_tokenizer("word")
    chat.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}so{% endif %}")
    reply = lambda *texts: [{"role": "assistant", "content": t} for t in texts]  # noqa: E731
    row = _row(chat, prompt=[{"role": "user", "content": "the"}], chosen=reply(" was great"), rejected=reply(" was dull"),
               prompt_ids=[chat.bos_token_id, *chat("the so", add_special_tokens=False)["input_ids"]])
    pairs, stats = _tokenize(chat, tmp_path, [row, {**row, "chosen": reply(" was", " great")}])
    assert [p.index for p in pairs] == [1] and list(pairs[0].chosen_ids) == row["chosen_ids"]
    assert "'chosen_ids' goes with one sampled reply, but 'chosen' holds 2 messages" in stats.examples[
        "sampled_ids_mismatch"]


def test_rows_with_and_without_ids_keep_their_order(word, tmp_path):
    plain = {"prompt": "the film", "chosen": " was fun", "rejected": " was flat"}
    pairs, _ = _tokenize(word, tmp_path, [plain, _row(word), plain])
    assert [p.index for p in pairs] == [1, 2, 3]
    assert pairs[0] .chosen_ids == pairs[2].chosen_ids != pairs[1].chosen_ids


@pytest.mark.parametrize(("changes", "message"), [
    ({"rejected_ids": None}, "field 'rejected_ids' is missing"),
    ({"chosen_ids": "1 2"}, "field 'chosen_ids' must be a non-empty list of token ids, got str"),
    ({"chosen_ids": [1, -2]}, "field 'chosen_ids' must be a non-empty list of token ids, got a list holding"),
    ({"prompt_ids": []}, "field 'prompt_ids' must be a non-empty list of token ids, got a list holding nothing"),
])
def test_malformed_id_fields_are_a_one_line_error_naming_row_and_field(word, tmp_path, changes, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [_row(word, **changes)])
    with pytest.raises(DpokitError, match=f"bad.jsonl, line 1: {message}"):
        list(read_pairs(str(path)))


def test_the_pair_rows_online_writes_carry_the_ids(word):
    completions = [Completion("x", (2, 5), (7, 3), True), Completion("y", (2, 5), (8,), False)]
    rows, _ = preference_pairs(["p"], [["x", "y"]], [[1.0, 0.0]], "all", [[True, False]], sampled=[completions])
    assert json.loads(json.dumps(rows))[0] | {} == {
        "prompt": "p", "chosen": "x", "rejected": "y", "score_chosen": 1.0, "score_rejected": 0.0,
        "chosen_finished": True, "rejected_finished": False, "prompt_ids": [2, 5], "chosen_ids": [7, 3],
        "rejected_ids": [8]}
