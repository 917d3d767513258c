"""Sources and layouts: every file kind, every layout, column mapping, skips by reason, errors."""

import json

import pytest

from dpokit.config import DataConfig, validate_data
from dpokit.data import read_pairs
from dpokit.data.pairs import parse_columns
from dpokit.errors import DpokitError

HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path, **options):
    reader = read_pairs(str(path), DataConfig(**options))
    pairs = list(reader)
    return pairs, reader.stats


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


# --- layouts ----------------------------------------------------------------------------------


def test_standard_explicit_prompt_keeps_extra_columns_and_nested_scores(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": " good", "rejected": " bad", "id": 7,
         "metadata": {"score_chosen": 9.0, "score_rejected": 8.0}},
        {"prompt": "Q2", "chosen": " same", "rejected": " same", "id": 8},
        {"prompt": "Q3", "chosen": " ", "rejected": " bad", "id": 9},
        {"prompt": "Q4", "chosen": None, "rejected": " bad", "id": 10},
    ]
    pairs, stats = _read(_jsonl(tmp_path / "s.jsonl", rows))
    assert stats.layout == "standard" and stats.rows_read == 4
    [pair] = pairs
    assert (pair.prompt, pair.chosen, pair.rejected, pair.index) == ("Q1", " good", " bad", 1)
    assert pair.scores == (9.0, 8.0)
    assert pair.extra == {"id": 7, "metadata": {"score_chosen": 9.0, "score_rejected": 8.0}}
    assert stats.skipped == {"identical": [2], "empty_response": [3], "non_string": [4]}
    assert "line 4: field 'chosen' must be a string, got null" in stats.examples["non_string"]


def test_implicit_hh_splits_at_the_last_assistant_turn_not_the_common_prefix(tmp_path):
    # Row 2's replies share " I " after the tag: a longest-common-prefix split would move it
    # into the prompt.
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: q\n\nAssistant: I agree", "rejected": "\n\nHuman: q\n\nAssistant: I refuse"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},  # differ before
        {"chosen": "no turns at all", "rejected": "\n\nHuman: q\n\nAssistant: y"},
    ]
    pairs, stats = _read(_jsonl(tmp_path / "hh.jsonl", rows))
    assert stats.layout == "implicit"
    first, second = pairs
    assert first.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert (first.chosen, first.rejected) == (" fine, thanks", " go away")
    assert second.prompt == "\n\nHuman: q\n\nAssistant:" and second.chosen == " I agree"
    assert stats.skipped == {"prompt_mismatch": [3], "no_assistant_turn": [4]}
    assert "differ before the last assistant turn" in stats.examples["prompt_mismatch"]


def test_conversational_implicit_explicit_system_and_multi_turn(tmp_path):
    system = {"role": "system", "content": "be brief"}
    rows = [
        # H4 style: explicit string prompt, chosen/rejected repeat it
        {"prompt": "hi", "chosen": [_user("hi"), _bot("hello")], "rejected": [_user("hi"), _bot("go")],
         "messages": [_user("hi"), _bot("hello")], "prompt_id": "abc", "score_chosen": 5, "score_rejected": 5},
        # implicit prompt, system message, multi-turn
        {"chosen": [system, _user("a"), _bot("b"), _user("c"), _bot("yes")],
         "rejected": [system, _user("a"), _bot("b"), _user("c"), _bot("no")]},
        # TRL style: prompt as messages, responses as assistant messages only
        {"prompt": [_user("q")], "chosen": [_bot("good")], "rejected": [_bot("bad")]},
        # conversations that differ before the final turn
        {"chosen": [_user("a"), _bot("x")], "rejected": [_user("b"), _bot("y")]},
        # the conversation does not continue the row's prompt
        {"prompt": "other", "chosen": [_user("a"), _bot("x")], "rejected": [_user("a"), _bot("y")]},
        {"chosen": [_user("a"), {"role": "assistant"}], "rejected": [_user("a"), _bot("y")]},
    ]
    pairs, stats = _read(_jsonl(tmp_path / "c.jsonl", rows))
    assert stats.layout == "conversational"
    h4, multi, trl = pairs
    assert h4.prompt == [_user("hi")] and h4.chosen == [_bot("hello")] and h4.rejected == [_bot("go")]
    assert h4.scores == (5.0, 5.0) and h4.extra == {"prompt_id": "abc"}  # `messages` duplicates chosen
    assert multi.prompt == [system, _user("a"), _bot("b"), _user("c")] and multi.chosen == [_bot("yes")]
    assert trl.prompt == [_user("q")] and trl.rejected == [_bot("bad")]
    assert stats.skipped == {"prompt_mismatch": [4, 5], "malformed_messages": [6]}
    assert stats.rows_with_scores == 1 and stats.tied_scores == 1


def test_sharegpt_rows(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
             "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
            {"conversations": [{"from": "alien", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}]
    pairs, stats = _read(_jsonl(tmp_path / "g.jsonl", rows))
    assert stats.layout == "sharegpt"
    [pair] = pairs
    assert pair.prompt == [{"role": "system", "content": "s"}, _user("q")]
    assert pair.chosen == [_bot("good")] and pair.rejected == [_bot("bad")]
    assert stats.skipped == {"malformed_messages": [2]}


def test_column_mapping_with_dotted_scores_and_forced_format(tmp_path):
    rows = [{"question": "Q", "good": " a", "bad": " b", "meta": {"s1": 2, "s2": "1.5"}}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    pairs, stats = _read(path, columns="prompt=question,chosen=good,rejected=bad,score_chosen=meta.s1,"
                                        "score_rejected=meta.s2")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].scores) == ("Q", " a", (2.0, 1.5))
    assert pairs[0].extra == {"meta": {"s1": 2, "s2": "1.5"}}
    with pytest.raises(DpokitError, match=r"m.jsonl, line 1: missing column 'q' \(mapped to prompt"):
        _read(path, columns="prompt=q,chosen=good,rejected=bad")
    # --data-format implicit on rows that have a prompt: the prompt column is ignored, not an error
    hh = _jsonl(tmp_path / "hh.jsonl", [{"prompt": "x", "chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    pairs, stats = _read(hh, data_format="implicit")
    assert stats.layout == "implicit" and pairs[0].chosen == " fine, thanks"


def test_parse_columns_errors():
    with pytest.raises(DpokitError, match="--columns: expected NAME=COLUMN"):
        validate_data(DataConfig(columns="prompt"))
    assert parse_columns("prompt = q , chosen=c") == {"prompt": "q", "chosen": "c"}
    for bad, message in [("prompt", "expected NAME=COLUMN"), ("answer=a", "unknown name 'answer'"),
                         ("prompt=a,prompt=b", "mapped twice")]:
        with pytest.raises(DpokitError, match=message):
            parse_columns(bad)


def test_drop_tied_scores_and_strict(tmp_path):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b", "score_chosen": 1, "score_rejected": 1},
            {"prompt": "p", "chosen": " a", "rejected": " a", "score_chosen": 2, "score_rejected": 1},
            {"prompt": "p", "chosen": " c", "rejected": " d", "score_chosen": 3, "score_rejected": 1}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    pairs, stats = _read(path, drop_tied_scores=True)
    assert [p.index for p in pairs] == [3] and stats.skipped == {"tied_scores": [1], "identical": [2]}
    assert stats.tied_scores == 1 and stats.rows_with_scores == 3
    with pytest.raises(DpokitError, match=r"t.jsonl, line 2: chosen and rejected are identical.*--strict"):
        _read(path, strict=True)


# --- sources ----------------------------------------------------------------------------------

ROWS = [{"prompt": "p1", "chosen": " a", "rejected": " b", "score": 1.0},
        {"prompt": "p2", "chosen": " c", "rejected": " d", "score": 2.0}]


def _check_rows(pairs, stats, kind):
    assert stats.kind == kind and stats.layout == "standard" and stats.rows_read == 2
    assert [(p.prompt, p.chosen, p.rejected, p.index) for p in pairs] == [("p1", " a", " b", 1), ("p2", " c", " d", 2)]


def test_json_array_csv_tsv_parquet_and_saved_dataset(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=1))
    _check_rows(*_read(tmp_path / "a.json"), "json")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON Lines named .json
    _check_rows(*_read(tmp_path / "lines.json"), "jsonl")
    (tmp_path / "a.csv").write_text('prompt,chosen,rejected,score\np1, a, b,1\n"p2"," c"," d",2\n')
    _check_rows(*_read(tmp_path / "a.csv"), "csv")
    (tmp_path / "a.tsv").write_text("prompt\tchosen\trejected\np1\t a\t b\np2\t c\t d\n")
    _check_rows(*_read(tmp_path / "a.tsv"), "tsv")

    import datasets

    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "a.parquet"))
    _check_rows(*_read(tmp_path / "a.parquet"), "parquet")
    dataset.save_to_disk(str(tmp_path / "saved"))
    _check_rows(*_read(tmp_path / "saved"), "saved dataset")
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dd"))
    _check_rows(*_read(tmp_path / "dd"), "saved dataset")  # the train split by default
    pairs, _ = _read(f"{tmp_path / 'dd'}:test")
    assert [p.prompt for p in pairs] == ["p1"]
    with pytest.raises(DpokitError, match="no split 'dev' \\(splits: train, test\\)"):
        _read(f"{tmp_path / 'dd'}:dev")
    # conversational rows survive parquet's nested list<struct> columns
    chat = [{"prompt": "hi", "chosen": [_user("hi"), _bot("hello")], "rejected": [_user("hi"), _bot("go")]}]
    datasets.Dataset.from_list(chat).to_parquet(str(tmp_path / "chat.parquet"))
    pairs, stats = _read(tmp_path / "chat.parquet")
    assert stats.layout == "conversational" and pairs[0].chosen == [_bot("hello")]


def test_jsonl_reading_does_not_import_datasets(tmp_path):
    import subprocess
    import sys

    path = _jsonl(tmp_path / "a.jsonl", ROWS)
    code = ("import sys; from dpokit.data import read_pairs; list(read_pairs(sys.argv[1])); "
            "print('datasets' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- errors: one line naming file, row and field ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "p", "chosen": " a", "rejected": " b"}\n{not json\n',
         r"bad.jsonl, line 2: not valid JSON \(Expecting property name"),
        ("arr.json", '[{"prompt": "p",\n "chosen": " a" "rejected": " b"}]',
         r"arr.json, line 2: not valid JSON"),
        ("list.jsonl", '["p", "a", "b"]\n', r"list.jsonl, line 1: expected a JSON object"),
        ("type.jsonl", '{"prompt": "a", "chosen": 3, "rejected": "b"}\n',
         r"type.jsonl, line 1: cannot detect the layout: field 'chosen' must be a string or a list"),
        ("unknown.jsonl", '{"question": "a", "answer": "b"}\n',
         r"unknown.jsonl, line 1: unknown layout \(columns: answer, question\).*--columns"),
        ("missing.jsonl", '{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "p", "chosen": " a"}\n',
         r"missing.jsonl, line 2: missing field 'rejected' \(layout standard"),
        ("empty.jsonl", "\n\n", r"data file .*empty.jsonl holds no rows"),
        ("short.csv", "prompt,chosen,rejected\np,a\n", r"short.csv, row 1: 2 fields but the header has 3"),
        ("bin.jsonl", b"\xff\xfe\x00garbage", r"bin.jsonl: not UTF-8"),
        ("broken.parquet", b"PAR1 this is not parquet", r"broken.parquet: cannot read parquet"),
    ],
)
def test_malformed_sources_fail_with_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DpokitError, match=message) as info:
        _read(path)
    assert "\n" not in str(info.value)


def test_forced_layout_missing_column_and_unknown_paths(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"chosen": " a", "rejected": " b"}])
    with pytest.raises(DpokitError, match=r"c.jsonl, line 1: missing field 'prompt' \(layout standard"):
        _read(path, data_format="standard")
    with pytest.raises(DpokitError, match="does not exist"):
        _read(tmp_path / "nope.jsonl")
    with pytest.raises(DpokitError, match="does not exist"):
        _read("some-org/missing-file.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DpokitError, match="not one written by datasets.save_to_disk"):
        _read(tmp_path / "plain")


def test_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DpokitError, match=r"data no-such-org/no-such-set:test: no such file or folder; as a hub "
                                          r"id: offline \(HF_HUB_OFFLINE=1\) and not cached") as info:
        _read("no-such-org/no-such-set:test")
    assert "\n" not in str(info.value)
