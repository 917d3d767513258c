"""Responses cut off by a token limit never ended: `chosen_finished` / `rejected_finished` false
gives them no EOS in every layout, and best-over-worst pairing prefers finished samples (issue 15, part 1)."""

import json

import pytest
import torch

from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.doctor import format_report, inspect_data
from dpokit.data.pairs import PreferencePair
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from dpokit.experiments.online import preference_pairs
from dpokit.model.logprobs import sequence_logps
from dpokit.model.reference import data_fingerprint
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs, write_jsonl

# Closes each assistant turn with a token that is not EOS, then a newline (as Gemma's `<end_of_turn>\n`).
TEMPLATE_TURN_END = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Closes each assistant turn with EOS and a newline (as ChatML's `<|im_end|>\n` does).
TEMPLATE_EOS_END = TEMPLATE_TURN_END.replace("<|end|>", "{{ eos_token }}")


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer("word")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_finished_fields_are_read_per_row_and_absent_or_null_means_finished(tmp_path):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c", "chosen_finished": False},
            {"prompt": "a", "chosen": " d", "rejected": " e"},
            {"prompt": "a", "chosen": " f", "rejected": " g", "chosen_finished": None, "rejected_finished": False}]
    reader = read_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    pairs = list(reader)
    assert [(p.chosen_finished, p.rejected_finished) for p in pairs] == [(False, True), (True, True), (True, False)]
    assert all(p.extra == {} for p in pairs)  # the flags are read, not carried as extra columns
    assert reader.stats.unfinished == {"chosen": 1, "rejected": 1}
    chat = [{"prompt": "hi", "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}], "rejected_finished": False}]
    [pair] = read_pairs(str(write_jsonl(tmp_path / "chat.jsonl", chat)))
    assert pair.is_chat and (pair.chosen_finished, pair.rejected_finished) == (True, False)


def test_a_flag_that_is_not_a_boolean_is_a_one_line_error_naming_file_row_and_field(tmp_path):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"},
            {"prompt": "a", "chosen": " b", "rejected": " c", "rejected_finished": "no"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DpokitError) as error:
        list(read_pairs(str(path)))
    message = str(error.value)
    assert "\n" not in message and "bad.jsonl" in message and "line 2" in message
    assert "field 'rejected_finished' must be true or false, got str 'no'" in message
    with pytest.raises(DpokitError, match="field 'chosen_finished' must be true or false, got int"):
        list(read_pairs(str(write_jsonl(tmp_path / "one.jsonl", [{**rows[0], "chosen_finished": 1}]))))
    # CSV fields are all text: true/false are read as booleans there, and only there.
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected,chosen_finished\na, b, c,FALSE\n", encoding="utf-8")
    [pair] = read_pairs(str(tmp_path / "p.csv"))
    assert pair.chosen_finished is False


def test_an_unfinished_response_gets_no_eos_and_a_finished_one_exactly_one(word_tok):
    eos = word_tok.eos_token_id
    pairs = [PreferencePair("the film was", " great fun", " dull", 1, chosen_finished=False),
             PreferencePair("the film was", " great </s>", " dull", 2, rejected_finished=False),
             PreferencePair("the film was", " </s>", " dull", 3, chosen_finished=False)]
    [first, second], stats = PairTokenizer(word_tok, max_length=64).tokenize(pairs)
    assert list(first.chosen_ids) == _ids(word_tok, "great fun")  # what was generated, nothing added
    assert list(first.rejected_ids) == [*_ids(word_tok, "dull"), eos]
    assert list(second.chosen_ids) == [*_ids(word_tok, "great"), eos]
    assert eos not in second.rejected_ids
    # A response that is nothing but EOS and never ended has no token left to train on.
    assert stats.skipped == {"special_token_in_response": [3]}


@pytest.mark.parametrize("template", [TEMPLATE_TURN_END, TEMPLATE_EOS_END], ids=["turn-end-token", "eos-turn-end"])
def test_an_unfinished_chat_reply_stops_at_its_text_without_the_templates_turn_end(template):
    tok = build_tokenizer("bpe", corpus=["<|user|> <|assistant|> <|end|> what is the capital? paris london"] * 10,
                          vocab_size=300)
    tok.chat_template = template
    prompt = [{"role": "user", "content": "what is the capital?"}]
    reply = [{"role": "assistant", "content": "paris"}]
    finished = PreferencePair(prompt, reply, [{"role": "assistant", "content": "london"}], 1)
    cut = PreferencePair(prompt, reply, [{"role": "assistant", "content": "london"}], 2, chosen_finished=False)
    [done, open_], _ = PairTokenizer(tok, max_length=128).tokenize([finished, cut])
    assert done.chosen_ids[-1] == tok.eos_token_id and open_.chosen_ids[-1] != tok.eos_token_id
    assert tok.decode(list(open_.chosen_ids)).replace(" ", "") == "paris"
    assert open_.rejected_ids == done.rejected_ids  # the finished side is untouched


def test_every_layout_scores_cut_responses_without_an_eos(word_tok):
    rows = make_pairs(6, seed=5)
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i, chosen_finished=i % 2 == 0,
                            rejected_finished=i % 3 != 0) for i, r in enumerate(rows)]
    tokenized, _ = PairTokenizer(word_tok, max_length=64).tokenize(pairs)
    eos = word_tok.eos_token_id
    model = build_tiny_llama(word_tok, seed=3).eval()
    with torch.no_grad():
        padded = sequence_logps(model, collate(tokenized, word_tok.pad_token_id, "padded"))
    for layout in LAYOUTS:
        batch = collate(tokenized, word_tok.pad_token_id, layout)
        n = len(tokenized)
        for seq, (pair, side) in enumerate([(p, "chosen") for p in tokenized] + [(p, "rejected") for p in tokenized]):
            scored = batch.targets[batch.score_seq == seq].tolist()
            assert scored == list(getattr(pair, f"{side}_ids")), (layout, seq)
            finished = getattr(pairs[pair.index], f"{side}_finished")
            assert (scored[-1] == eos) == finished and scored.count(eos) == finished, (layout, seq)
        with torch.no_grad():
            out = sequence_logps(model, batch)
        torch.testing.assert_close(out.chosen_logps, padded.chosen_logps, atol=1e-5, rtol=0, msg=layout)
        torch.testing.assert_close(out.rejected_logps, padded.rejected_logps, atol=1e-5, rtol=0, msg=layout)
        assert batch.num_pairs == n


def test_the_reference_cache_key_tells_a_cut_response_from_a_finished_one(word_tok):
    # The cached reference log-probs of "great fun" + EOS are not those of "great fun" alone.
    finished, _ = PairTokenizer(word_tok, max_length=64).tokenize([PreferencePair("the film", " great fun", " dull", 1)])
    cut, _ = PairTokenizer(word_tok, max_length=64).tokenize(
        [PreferencePair("the film", " great fun", " dull", 1, chosen_finished=False)])
    assert data_fingerprint(finished) != data_fingerprint(cut)


def test_data_inspect_counts_responses_marked_unfinished(tmp_path, word_tok):
    rows = [{"prompt": "the film was", "chosen": " great", "rejected": " dull", "rejected_finished": False}] * 2
    report = inspect_data(str(write_jsonl(tmp_path / "p.jsonl", rows)), DataConfig(), word_tok)
    assert report["unfinished_responses"] == {"chosen": 0, "rejected": 2}
    assert "responses marked unfinished (cut off, so they get no EOS): 0 chosen, 2 rejected" in format_report(report)
    assert report["lengths"]["rejected"]["max"] == len(_ids(word_tok, "dull"))  # no EOS counted


def test_pairing_prefers_finished_samples_and_counts_pairs_with_a_cut_response():
    texts = [["a", "b", "c", "d"]]
    scores = [[0.9, 0.5, 0.1, -0.5]]
    finished = [[False, True, True, False]]  # the best and the worst were cut
    rows, stats = preference_pairs(["p"], texts, scores, "best_worst", finished)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "c")]
    assert (rows[0]["chosen_finished"], rows[0]["rejected_finished"]) == (True, True)
    assert stats["pairs_with_cut_response"] == 0
    # `all` keeps every pair, each saying which of its responses were cut.
    rows, stats = preference_pairs(["p"], texts, scores, "all", finished)
    assert [(r["chosen"], r["rejected"], r["chosen_finished"], r["rejected_finished"]) for r in rows] == [
        ("a", "b", False, True), ("a", "c", False, True), ("a", "d", False, False), ("b", "c", True, True),
        ("b", "d", True, False), ("c", "d", True, False)]
    assert stats["pairs_with_cut_response"] == 5
    # Fewer than two finished samples with different scores: every sample is paired, and the
    # rows say which responses were cut.
    for ends in ([[False, True, False, False]], [[True, False, False, False]]):
        rows, stats = preference_pairs(["p"], texts, scores, "best_worst", ends)
        assert [(r["chosen"], r["rejected"], r["chosen_finished"], r["rejected_finished"]) for r in rows] == [
            ("a", "d", ends[0][0], False)]
        assert stats["pairs_with_cut_response"] == 1
    rows, stats = preference_pairs(["p"], [["a", "b", "c"]], [[0.2, 0.2, 0.1]], "all", [[True, True, False]])
    assert len(rows) == 2 and stats["pairs_with_cut_response"] == 2 and stats["skipped"]["tied_scores"] == 1
    chat, _ = preference_pairs([[{"role": "user", "content": "hi"}]], [["x", "y"]], [[1.0, 0.0]], "all",
                               [[False, True]])
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "x"}] and chat[0]["chosen_finished"] is False


def test_pair_rows_round_trip_through_the_reader(tmp_path):
    rows, _ = preference_pairs(["p"], [["a", "b"]], [[1.0, 0.0]], "all", [[False, True]])
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    [pair] = read_pairs(str(path))
    assert (pair.chosen_finished, pair.rejected_finished) == (False, True) and pair.scores == (1.0, 0.0)
