"""`dpokit sample`, `evaluate`, `report` and `sweep` through the real entry point."""

import csv
import json

import pytest

from dpokit.cli import main
from helpers.toy import make_pairs, write_jsonl
from test_cli import dpokit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prompts_file(folder):
    return write_jsonl(folder / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(6, seed=3)])


def test_sample_command_streams_a_reproducible_file(tiny_model_dir, tmp_path):
    prompts = _prompts_file(tmp_path)
    args = ["sample", "--model", tiny_model_dir, "--prompts", prompts, "--num-samples", 2, "--max-new-tokens", 5,
            "--seed", 3, "--sample-batch-size", 5]
    first = dpokit(*args, "--output", tmp_path / "a.jsonl")
    assert first.returncode == 0, first.stderr
    assert main([*map(str, args), "--output", str(tmp_path / "b.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in make_pairs(6, seed=3)]
    assert all(len(r["completions"]) == 2 for r in rows)
    assert all(len(r["finished"]) == 2 and all(isinstance(f, bool) for f in r["finished"]) for r in rows)
    assert all(len(r["completion_ids"]) == 2 and r["prompt_ids"] for r in rows)  # what was sampled, exactly
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert not (tmp_path / "a.jsonl.partial").exists()



def _fails_with_one_line(capsys, args, *fragments):
    assert main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), lines


def test_bad_input_gets_one_line_errors(tiny_model_dir, tmp_path, capsys):
    base = ["sample", "--model", tiny_model_dir]
    _fails_with_one_line(capsys, base, "exactly one of --prompt TEXT and --prompts FILE.jsonl")
    _fails_with_one_line(capsys, ["sample", "--prompt", "x"], "missing required option: --model")
    _fails_with_one_line(capsys, [*base, "--prompt", "the film", "--top-p", 0], "--top-p must be in (0, 1]")
    _fails_with_one_line(capsys, [*base, "--prompt", "the film", "--temperature", "hot"], "--temperature: expected float")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    _fails_with_one_line(capsys, [*base, "--prompts", bad], f"{bad}, line 1", "'prompt' must be a string")
    _fails_with_one_line(capsys, ["evaluate", "--model", tiny_model_dir, "--prompts", bad], "--reference-model is required")
    _fails_with_one_line(capsys, ["evaluate", "--model", tiny_model_dir, "--reference-model", tiny_model_dir],
                         "nothing to evaluate")
    _fails_with_one_line(capsys, ["evaluate", "--model", tiny_model_dir, "--reference-model", tiny_model_dir,
                                  "--prompts", tmp_path / "missing.jsonl"], "missing.jsonl does not exist")
    _fails_with_one_line(capsys, ["sweep", "--beta", "0.1,x", "--model", tiny_model_dir, "--data", bad,
                                  "--output", tmp_path / "s"], "--beta: expected comma-separated float")
    _fails_with_one_line(capsys, ["sweep", "--beta", "0.1", "--model", tiny_model_dir, "--data", bad,
                                  "--output", tmp_path / "s"], "needs --prompts and --judge")
    _fails_with_one_line(capsys, ["report", tmp_path], "not a dpokit run folder")


def test_evaluate_command_json_and_table(trained_run, toy_data, tmp_path, capsys):
    _, eval_file = toy_data
    prompts = _prompts_file(tmp_path)
    args = ["evaluate", "--model", str(trained_run), "--data", str(eval_file), "--prompts", str(prompts),
            "--judge", "sentiment", "--num-samples", "2", "--max-new-tokens", "6", "--max-length", "32"]
    assert main([*args, "--json", "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON object alone
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert result["preferences"]["pairs"] == 16 and result["preferences"]["beta"] == 0.1  # the run's own β
    assert 0.0 <= result["judged"]["win_rate"] <= 1.0 and result["judged"]["prompts"] == 6
    assert result["kl"]["sequences"] == 12 and result["kl"]["kl_stderr"] > 0
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "rewards/accuracies" in table and "win_rate" in table and "kl_stderr" in table
    # β scales the implicit rewards and nothing else.
    assert main(["evaluate", "--model", str(trained_run), "--data", str(eval_file), "--max-length", "32",
                 "--beta", "0.5", "--json"]) == 0
    scaled = json.loads(capsys.readouterr().out)["preferences"]
    assert scaled["rewards/margins"] == pytest.approx(5 * result["preferences"]["rewards/margins"], rel=1e-4)
    assert scaled["rewards/accuracies"] == result["preferences"]["rewards/accuracies"]


def test_report_command_writes_curves_and_summary(trained_run, tmp_path):
    prompts = _prompts_file(tmp_path)
    assert main(["report", str(trained_run), "--prompts", str(prompts), "--max-prompts", "2",
                 "--max-new-tokens", "5"]) == 0
    assert (trained_run / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    report = (trained_run / "report.md").read_text()
    for heading in ("Final training figures", "Held-out figures", "Samples before / after", "Configuration"):
        assert heading in report, heading
    samples = json.loads((trained_run / "samples.json").read_text())
    assert [r["prompt"] for r in samples["rows"]] == [r["prompt"] for r in make_pairs(2, seed=3)]


def test_sweep_two_betas_end_to_end(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    prompts = _prompts_file(tmp_path)
    out = tmp_path / "sweep"
    code = main(["sweep", "--beta", "0.1,0.5", "--model", str(tiny_model_dir), "--data", str(train_file),
                 "--eval-data", str(eval_file), "--output", str(out), "--max-steps", "6", "--batch-size", "8",
                 "--learning-rate", "1e-3", "--max-length", "32", "--prompts", str(prompts), "--judge",
                 "sentiment", "--num-samples", "2", "--max-new-tokens", "6", "--progress", "off"])
    assert code == 0
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert [r["run"] for r in rows] == ["reference", "sigmoid-beta0.1", "sigmoid-beta0.5"]
    assert [r["beta"] for r in rows[1:]] == ["0.1", "0.5"]
    assert all(float(r["kl"]) > 0 for r in rows[1:]) and float(rows[0]["kl"]) == 0.0
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["points"]) == 3
    for run in ("sigmoid-beta0.1", "sigmoid-beta0.5"):
        assert json.loads((out / run / "evaluation.json").read_text())["kl"]["sequences"] == 12
        assert (out / run / "report.md").is_file()
        assert "beta: 0." in (out / run / "dpokit_config.yaml").read_text()
