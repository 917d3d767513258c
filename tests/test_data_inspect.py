"""The data doctor on a fixture whose every figure is worked out by hand, and through the CLI."""

import json

import pytest

from dpokit.config import DataConfig
from dpokit.data.doctor import format_report, inspect_data
from helpers.toy import build_tokenizer, make_pairs
from test_cli import _one_line_error, dpokit

# Word tokenizer: one token per word; prompts get BOS, responses EOS.
ROWS = [
    {"prompt": "the film was", "chosen": " great fun", "rejected": " dull", "score_chosen": 5, "score_rejected": 3},
    {"prompt": "the plot", "chosen": " great", "rejected": " dull and flat", "score_chosen": 4, "score_rejected": 4},
    {"prompt": "the film was", "chosen": " wonderful bright warm", "rejected": " bleak"},  # repeats row 1's prompt
    {"prompt": "the cast", "chosen": " fun", "rejected": " fun"},  # identical
    {"prompt": "the cast", "chosen": "  ", "rejected": " dull"},  # empty response
    {"prompt": "the story " * 8, "chosen": " fun", "rejected": " dull"},  # prompt 17 tokens > 12: dropped
    {"prompt": "the film", "chosen": " great" * 10, "rejected": " dull"},  # 3 + 11 > 12: responses cut
]
# Token lengths (prompt incl. BOS, responses incl. EOS) of the rows that reach tokenization
# (1, 2, 3, 6, 7): prompt 4 3 4 17 3; chosen 3 2 4 2 11; rejected 2 4 2 2 2.
# chosen - rejected: 1 -2 2 0 9 -> chosen longer 3/5, rejected longer 1/5, equal 1/5, mean +2.


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_doctor_with_a_tokenizer_hand_worked(data_file):
    report = inspect_data(str(data_file), DataConfig(max_length=12, min_response_share=0),
                          tokenizer=build_tokenizer("word"))
    assert (report["rows_read"], report["rows_kept"], report["layout"]) == (7, 4, "standard")
    assert report["skipped"] == {"identical": 1, "empty_response": 1, "prompt_too_long": 1}
    assert report["skipped_rows"] == {"identical": [4], "empty_response": [5], "prompt_too_long": [6]}
    lengths = report["lengths"]
    assert lengths["units"] == "tokens"
    assert lengths["prompt"] == {"count": 5, "min": 3, "mean": 6.2, "median": 4, "p95": 17, "max": 17}
    assert lengths["chosen"] == {"count": 5, "min": 2, "mean": 4.4, "median": 3, "p95": 11, "max": 11}
    assert lengths["rejected"] == {"count": 5, "min": 2, "mean": 2.4, "median": 2, "p95": 4, "max": 4}
    assert lengths["longest_sequence"]["max"] == 19  # row 6: 17 + 2
    assert report["truncated"] == {"max_length": 12, "max_prompt_length": None, "truncation_mode": "keep_end",
                                   "min_response_share": 0, "rows_cut": 1, "prompts_cut": 0, "responses_cut": 1, "rows_dropped": 1}
    assert report["length_bias"] == {"pairs": 5, "chosen_longer": 0.6, "rejected_longer": 0.2, "equal": 0.2,
                                     "mean_difference": 2.0, "units": "tokens"}
    assert report["duplicate_prompts"] == {"rows": 1, "distinct_prompts": 1}
    assert report["identical_pairs"] == 1
    assert report["tied_scores"] == {"rows_with_scores": 2, "tied": 1}
    assert report["boundary"] == {"merges": 0, "glued_text_rows": 0}
    text = format_report(report)
    assert "rows read 7, kept 4, skipped 3" in text and "prompt_too_long: 1 (lines 6)" in text
    assert "chosen longer in 60.0% of pairs" in text and "1 of 2 rows have tied scores" in text


def test_doctor_without_a_tokenizer_counts_characters(data_file):
    report = inspect_data(str(data_file), DataConfig(max_length=12))
    assert report["lengths"]["units"] == "characters" and report["truncated"] is None
    assert report["rows_kept"] == 5  # nothing is truncated or dropped without tokens
    assert report["lengths"]["chosen"]["max"] == len(" great" * 10) == 60
    assert report["lengths"]["prompt"]["min"] == len("the film") == 8
    assert "not estimated without a tokenizer" in format_report(report)


def test_cli_inspect_json_plot_and_errors(tiny_model_dir, data_file, tmp_path):
    plot = tmp_path / "lengths.png"
    proc = dpokit("data", "inspect", data_file, "--model", tiny_model_dir, "--max-length", 12, "--json",
                  "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("rows_read", "rows_kept", "skipped", "layout", "lengths", "truncated", "length_bias"):
        assert key in report
    # By default row 6's long prompt is cut (not dropped): 5 rows kept, 2 cut.
    assert (report["rows_kept"], report["truncated"]["rows_cut"], report["length_bias"]["chosen_longer"]) == (5, 2, 0.6)
    assert report["truncated"]["prompts_cut"] == 1 and report["truncated"]["rows_dropped"] == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1])[:-3] + "\n")
    _one_line_error(dpokit("data", "inspect", bad), f"{bad}, line 2", "not valid JSON")
    _one_line_error(dpokit("data", "inspect", data_file, "--strict"), "line 4", "identical", "--strict")


def test_train_accepts_conversational_data_with_a_chat_template_file(tiny_model_dir, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in make_pairs(24, seed=3)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    out = tmp_path / "run"
    proc = dpokit("train", "--model", tiny_model_dir, "--data", data, "--output", out, "--chat-template", template,
                  "--max-steps", 2, "--batch-size", 4, "--max-length", 32)
    assert proc.returncode == 0, proc.stderr
    assert "24 rows read (conversational layout); 24/24 pairs kept" in proc.stdout
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == template.read_text()
