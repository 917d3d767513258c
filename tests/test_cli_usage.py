"""What a new user meets on the command line (issue 36): a closed stdout does not end training,
resume takes a data file by any name of it, options are never abbreviated and a mistyped one gets
the nearest names, config files speak of paths beside them and name the line of an unknown key,
and the small things: --version, evaluate's β default, plurals, export --merge without LoRA, the
runs table's β and LoRA columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpokit
from dpokit import cli
from dpokit.config import build_config, load_yaml
from dpokit.errors import DpokitError
from dpokit.runinfo import read_run
from dpokit.train.loop import train
from helpers.toy import make_pairs, write_jsonl

SMALL = ["--max-length", "32", "--batch-size", "4", "--learning-rate", "1e-3", "--progress", "off"]


def test_a_closed_stdout_does_not_end_training(tiny_model_dir, toy_data, tmp_path):
    """`dpokit train ... | head -1`: the reader goes away after one line; the run goes on to the end,
    saves everything, exits 0, and its train.log holds every line (it exited 0 with nothing saved)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpokit", "train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]),
           "--output", str(out), "--max-steps", "4", "--log-every", "1", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does once it has its line
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert (out / "model.safetensors").is_file() and (out / "checkpoints").is_dir()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    log = (out / "train.log").read_text().splitlines()
    assert log[0] == first.rstrip("\n")
    assert "dpokit: stdout was closed; training goes on, logging to this file only" in log
    assert [line for line in log if line.startswith("step ")][-1].startswith("step 4/4:")
    assert log[-1] == f"saved the trained policy and its tokenizer to {out}"


def _config(model_dir, data: str, out, **train_options):
    return build_config({"model": {"model": str(model_dir)}, "data": {"data": data, "max_length": 32},
                         "train": {"output": str(out), "batch_size": 4, "learning_rate": 1e-3, "progress": "off",
                                   **train_options}})


def test_resume_takes_the_data_file_by_any_name_of_it(tiny_model_dir, tmp_path, monkeypatch):
    """`--data ./data/res.jsonl` is the checkpoint's `data/res.jsonl` (it was refused as "differs");
    another file is still refused even with the same rows, and a resume appends to train.log."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "res.jsonl", make_pairs(16, seed=3))
    train(_config(tiny_model_dir, "data/res.jsonl", "run", max_steps=2), log=lambda _: None)
    for name in ("./data/res.jsonl", str(tmp_path / "data" / "res.jsonl")):
        result = train(_config(tiny_model_dir, name, "run", max_steps=2, resume="auto"), log=lambda _: None)
        assert result.steps == 2
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("resuming from run/checkpoints/step-0000002 at step 2/2") == 2 and log.count("step 1/2:") == 1
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "data" / "res.jsonl").read_bytes())
    with pytest.raises(DpokitError, match="--data differs"):
        train(_config(tiny_model_dir, "copy.jsonl", "run", max_steps=2, resume="auto"), log=lambda _: None)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--lr", "1e-3"], "dpokit train: error: unrecognized option --lr; did you mean one of "
                                "--learning-rate, --lora-r, --lr-scheduler? (see dpokit train --help)"),
    (["train", "--max-step", "3"], "unrecognized option --max-step; did you mean --max-steps?"),
    (["train", "--learning", "1e-3"], "unrecognized option --learning; did you mean --learning-rate?"),
    (["train", "--grad-accum=2"], "unrecognized option --grad-accum; did you mean --gradient-accumulation-steps?"),
    (["data", "inspect", "x.jsonl", "--jsn"], "dpokit data inspect: error: unrecognized option --jsn; did you "
                                              "mean --json? (see dpokit data inspect --help)"),
    (["evaluate", "--bet", "0.2"], "dpokit evaluate: error: unrecognized option --bet; did you mean one of --beta, "),
])
def test_options_are_never_abbreviated_and_a_typo_names_the_nearest(argv, message, capsys):
    """argparse's prefix matching read `--max-step 3` and `--learning` silently and `--lr 1e-3` as
    `--lr-scheduler 1e-3`; now each is one line from the subcommand, exit 2."""
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"dpokit {dpokit.__version__}\n"


def test_evaluate_help_gives_the_runs_own_settings_as_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "β (default: the run's own, else 0.1)" in text and "(default 0.1)" not in text
    assert "--max-length MAX_LENGTH most tokens in prompt + response; longer pairs are truncated (see docs/training.md) " \
           "(default: the run's own, else 1024)" in text


def test_config_file_errors_name_the_line_and_the_right_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {model: m}\ntraining:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(DpokitError, match=r"run.yaml line 2: unknown option 'training'; did you mean the section "
                                          r"'train'\?"):
        load_yaml(path)
    path.write_text("loss: {loss: sigmoid}\ntrain:\n  output: runs/a\n  beta: 0.3\n")
    with pytest.raises(DpokitError, match=r"run.yaml line 4: unknown option 'train.beta'; it belongs in the "
                                          r"section 'loss:'"):
        load_yaml(path)


def test_relative_paths_in_a_config_file_are_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "model").mkdir(parents=True)
    (folder / "prefs.jsonl").write_text("{}\n")
    (tmp_path / "only-here.jsonl").write_text("{}\n")
    (folder / "run.yaml").write_text("model: {model: ./model, reference_model: org/base}\n"
                                     "data: {data: prefs.jsonl, eval_data: only-here.jsonl}\n"
                                     "train: {output: runs/a, resume: auto}\nreference_cache: cache\n")
    monkeypatch.chdir(tmp_path)
    values = load_yaml("configs/run.yaml")
    assert values["model"] == {"model": str(Path("configs/model")), "reference_model": "org/base"}  # a hub id stays
    assert values["data"]["data"] == str(Path("configs/prefs.jsonl"))
    assert values["data"]["eval_data"] == "only-here.jsonl"  # not beside the file: as written, from here
    assert values["train"] == {"output": str(Path("configs/runs/a")), "resume": "auto"}
    assert values["speed"]["reference_cache"] == str(Path("configs/cache"))


def test_export_merge_on_a_run_without_lora_is_one_line(trained_run, tmp_path, capsys):
    assert cli.main(["export", str(trained_run), "--output", str(tmp_path / "x"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err == (f"dpokit: error: export: {trained_run} holds a full model, no LoRA adapter: --merge has "
                   "nothing to fold in; export it without\n")
    assert not (tmp_path / "x").exists()


def test_a_one_pair_sft_lora_run_counts_in_the_singular_and_lists_no_beta(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", make_pairs(1, seed=5))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                     "--loss", "sft", "--lora-r", "4", "--max-steps", "1", *SMALL]) == 0
    log = capsys.readouterr().out
    assert f"{data}: 1 row read" in log and ": 1 pair, global batch" in log and ", 1 step, loss sft" in log, log
    row = read_run(out).row()
    assert row["beta"] is None and row["lora"] == 4  # β changes nothing in sft; the LoRA rank is a column
    assert cli.main(["runs", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["lora"] == 4


def test_a_one_pair_dpo_run_counts_its_reference_pairs_in_the_singular(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", make_pairs(1, seed=6))
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                     "--reference", "precomputed", "--max-steps", "1", *SMALL]) == 0
    log = capsys.readouterr().out
    assert "reference log-probs of 1 pair: computed 1" in log, log


def test_evaluate_help_gives_the_runs_own_default_for_every_inherited_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 keeps the reference fixed (default: the run's own, else 0)" in text
    assert "(default)" not in text  # a default that says no value would not be rewritten to the run's own
