"""The real preference samples in ../shared/data/preferences: each layout is detected, rows are
kept and skipped as counted by hand, and every kept pair's tokens decode to its rendered text."""

import json

import pytest

from conftest import SHARED_DATA
from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.doctor import inspect_data
from dpokit.data.tokenize import PairTokenizer
from helpers.toy import build_tokenizer

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real samples not found at {SHARED_DATA}")

# ChatML-like: writes EOS (+ newline) after each assistant turn itself; the tokenizer adds BOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Counted by hand (see SOURCES.md and a look at the rows named): file -> (layout, rows, skipped).
# Some UltraFeedback replies hold a literal "</s>" mid-text (rows 139, 281, 462 of the H4 sample;
# rejected 227, 313, 567, 715 of the trl sample) or "<s>" (row 416): with our tokenizer (BOS "<s>",
# EOS "</s>") they cannot have one BOS and one EOS per sequence and are skipped when tokenized.
TOKEN_SKIPS = {
    "ultrafeedback_binarized_train_prefs_500.jsonl": {"special_token_in_response": [139, 281, 416, 462]},
    "ultrafeedback_trl_standard_train1000.jsonl": {"special_token_in_response": [227, 313, 567, 715]},
}
EXPECTED = {
    "hh_rlhf_harmless_base_test_first800.jsonl": ("implicit", 800, {"empty_response": [87, 517]}),
    "hh_rlhf_explicit_prompt_test1k.jsonl": (
        "standard", 1000, {"identical": [225, 528, 541, 674, 816, 983], "empty_response": [762]}),
    "ultrafeedback_binarized_train_prefs_500.jsonl": (
        "conversational", 500, {"empty_response": [51, 425], "identical": [296]}),
    "ultrafeedback_trl_standard_train1000.jsonl": (
        "standard", 1000, {"identical": [307, 656, 911, 998], "empty_response": [479, 834]}),
    "ultrafeedback_h4schema_reconstructed200.jsonl": ("conversational", 200, {"identical": [44]}),
}


@pytest.fixture(scope="module")
def real_tok():
    corpus = []
    for name in EXPECTED:
        with open(SHARED_DATA / name, encoding="utf-8") as handle:
            for _, line in zip(range(60), handle, strict=False):
                row = json.loads(line)
                corpus += [json.dumps(row["chosen"], ensure_ascii=False)]
    tok = build_tokenizer("bpe", corpus=corpus, vocab_size=800)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _expected_text(tok, prompt: str, response: str) -> str:
    """The rendered text with BOS once at the start and ending at exactly one EOS."""
    text = prompt + response
    bos, eos = tok.bos_token, tok.eos_token
    text = bos + text.removeprefix(bos)
    if text.rstrip().endswith(eos):
        return text.rstrip()
    return text + eos


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_sample_layout_counts_and_exact_tokens(real_tok, name):
    layout, rows, skipped = EXPECTED[name]
    reader = read_pairs(str(SHARED_DATA / name), DataConfig())
    pairs = list(reader)
    assert (reader.stats.layout, reader.stats.rows_read, reader.stats.skipped) == (layout, rows, skipped)
    pair_tokenizer = PairTokenizer(real_tok, max_length=10**6)
    tokenized, stats = pair_tokenizer.tokenize(pairs)
    token_skips = TOKEN_SKIPS.get(name, {})
    assert stats.skipped == token_skips
    assert stats.kept == len(tokenized) == rows - sum(map(len, skipped.values())) - sum(map(len, token_skips.values()))
    kept_pairs = [p for p in pairs if p.index in {tp.index for tp in tokenized}]
    for pair, tp in zip(kept_pairs, tokenized, strict=True):
        prompt, chosen, rejected = pair_tokenizer.render(pair)
        for response, ids in ((chosen, tp.chosen_ids), (rejected, tp.rejected_ids)):
            sequence = tp.prompt_ids + ids
            assert sequence.count(real_tok.bos_token_id) == 1 and sequence[0] == real_tok.bos_token_id
            assert ids.count(real_tok.eos_token_id) == 1 and ids[-1] == real_tok.eos_token_id
            decoded = real_tok.decode(sequence, skip_special_tokens=False)
            assert decoded == _expected_text(real_tok, prompt, response), (name, pair.index)


def test_real_rows_checked_by_hand(real_tok):
    hh = list(read_pairs(str(SHARED_DATA / "hh_rlhf_harmless_base_test_first800.jsonl")))
    first = hh[0]
    assert first.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert first.prompt.endswith("have anything to do with pens\n\nAssistant:")
    assert first.chosen.startswith(" No, sorry!  All of these involve a pen")
    assert first.rejected.startswith(" There are lots of funny things you can do with")

    h4_file = SHARED_DATA / "ultrafeedback_h4schema_reconstructed200.jsonl"
    raw = json.loads(h4_file.read_text(encoding="utf-8").splitlines()[0])
    h4 = list(read_pairs(str(h4_file)))
    assert h4[0].prompt == [{"role": "user", "content": raw["prompt"]}]
    assert h4[0].rejected == [raw["rejected"][1]] and h4[0].extra == {"prompt_id": raw["prompt_id"]}
    assert h4[0].prompt[0]["content"].startswith("Write a Java program that prompts the user")
    assert h4[0].chosen[0]["content"].startswith("Here's a Java program that prompts the user")
    assert h4[0].scores == (9.0, 7.0) and "prompt_id" in h4[0].extra

    [tp], _ = PairTokenizer(real_tok, max_length=10**6).tokenize(h4[:1])
    prompt_text = real_tok.decode(tp.prompt_ids, skip_special_tokens=False)
    assert prompt_text.startswith("<s><|user|>\nWrite a Java program") and prompt_text.endswith("<|assistant|>\n")
    assert real_tok.decode(tp.chosen_ids, skip_special_tokens=False).startswith("Here's a Java program")


def test_doctor_on_real_samples(real_tok):
    report = inspect_data(str(SHARED_DATA / "ultrafeedback_trl_standard_train1000.jsonl"), DataConfig())
    assert (report["rows_read"], report["rows_kept"], report["layout"]) == (1000, 994, "standard")
    assert report["skipped"] == {"identical": 4, "empty_response": 2} and report["identical_pairs"] == 4
    assert report["tied_scores"] == {"rows_with_scores": 1000, "tied": 111}  # SOURCES.md: 111 ties
    assert report["lengths"]["units"] == "characters" and report["truncated"] is None

    report = inspect_data(str(SHARED_DATA / "ultrafeedback_h4schema_reconstructed200.jsonl"),
                          DataConfig(max_length=256, max_prompt_length=128), tokenizer=real_tok)
    assert (report["rows_read"], report["rows_kept"], report["layout"]) == (200, 199, "conversational")
    assert report["tied_scores"]["tied"] == 25 and report["duplicate_prompts"]["rows"] == 0
    # Count by hand from the pipeline's own untruncated tokens: pairs longer than 256 get cut.
    encoded = PairTokenizer(real_tok, max_length=10**6).tokenize(
        read_pairs(str(SHARED_DATA / "ultrafeedback_h4schema_reconstructed200.jsonl")))[0]
    too_long = [p for p in encoded if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > 256]
    assert report["truncated"]["rows_cut"] == len(too_long) > 0 and report["truncated"]["rows_dropped"] == 0
    longer = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in encoded)
    assert report["length_bias"]["chosen_longer"] == round(longer / 199, 4)

    hh = inspect_data(str(SHARED_DATA / "hh_rlhf_harmless_base_test_first800.jsonl"), DataConfig())
    assert (hh["layout"], hh["rows_kept"], hh["skipped_rows"]) == ("implicit", 798, {"empty_response": [87, 517]})
    assert hh["boundary"]["glued_text_rows"] == 0  # "Assistant:" + " reply"
    explicit = inspect_data(str(SHARED_DATA / "hh_rlhf_explicit_prompt_test1k.jsonl"), DataConfig())
    assert explicit["boundary"]["glued_text_rows"] > 900  # prompts and replies were .strip()ped
