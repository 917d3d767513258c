"""The real entry point through a subprocess: a run end to end, --help, and bad input."""

import json
import os
import subprocess
import sys

import pytest

from dpokit.config import build_config, iter_options, load_yaml
from dpokit.errors import DpokitError


def dpokit(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dpokit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_train_end_to_end_then_reload(tiny_model_dir, toy_data, tmp_path):
    train_file, eval_file = toy_data
    out = tmp_path / "run"
    proc = dpokit("train", "--model", tiny_model_dir, "--data", train_file, "--eval-data", eval_file,
                  "--output", out, "--max-steps", 4, "--batch-size", 4, "--learning-rate", 1e-3,
                  "--max-length", 32, "--log-every", 2)
    assert proc.returncode == 0, proc.stderr
    assert "step 4/4" in proc.stdout and "saved the trained policy" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    resolved = load_yaml(out / "dpokit_config.yaml")
    assert resolved["train"]["max_steps"] == 4 and resolved["loss"]["beta"] == 0.1


def test_help_documents_every_option_with_its_default():
    proc = dpokit("train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for _, f in iter_options():
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default 0.1)" in text and "(default: 5e-07)" in text


def test_yaml_then_flags_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {model: m}\ndata: {data: d.jsonl}\nloss: {beta: 0.3}\noutput: o\nbatch-size: 2\n")
    layer = load_yaml(path)
    cfg = build_config(layer, {"loss": {"beta": 0.5}})
    assert cfg.loss.beta == 0.5 and cfg.train.batch_size == 2 and cfg.train.output == str(tmp_path / "o")  # beside the file
    path.write_text("loss: {betta: 0.3}\n")
    with pytest.raises(DpokitError, match="unknown option 'loss.betta'"):
        load_yaml(path)


def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_in_a_real_process_is_one_line(tiny_model_dir, toy_data, tmp_path):
    # The full table of mistakes runs in-process (tests/test_bad_inputs.py); these prove the real
    # process prints one line and exits non-zero for an argparse error and for a data error.
    train_file, _ = toy_data
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", train_file, "--output", tmp_path / "o",
                           "--bogus-flag", 1), "dpokit train: error: unrecognized option --bogus-flag")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train_file.read_text().splitlines()[0] + "\n{not json\n")
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "o2"),
                    f"{bad}, line 2", "not valid JSON")
