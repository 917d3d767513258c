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
    assert "(default: 0.1)" in text and "(default: 5e-07)" in text


def test_yaml_then_flags_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {model: m}\ndata: {data: d.jsonl}\nloss: {beta: 0.3}\noutput: o\nbatch-size: 2\n")
    layer = load_yaml(path)
    cfg = build_config(layer, {"loss": {"beta": 0.5}})
    assert cfg.loss.beta == 0.5 and cfg.train.batch_size == 2 and cfg.train.output == "o"
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


def test_bad_input_gets_one_line_errors(tiny_model_dir, toy_data, tmp_path):
    train_file, _ = toy_data
    base = ["train", "--model", tiny_model_dir, "--data", train_file, "--output", tmp_path / "o"]
    _one_line_error(dpokit(*base, "--bogus-flag", 1), "unrecognized arguments: --bogus-flag")
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--output", tmp_path / "o"), "--data")
    _one_line_error(dpokit(*base, "--beta", "-1"), "--beta must be a positive number")
    _one_line_error(dpokit(*base, "--beta", "abc"), "--beta: expected float")
    _one_line_error(dpokit(*base, "--loss", "nope"), "unknown loss 'nope'")
    missing = tmp_path / "missing.jsonl"
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", missing, "--output", tmp_path / "o"),
                    str(missing), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train_file.read_text().splitlines()[0] + "\n{not json\n")
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "o2"),
                    f"{bad}, line 2", "not valid JSON")
    wrong_type = tmp_path / "wrong.jsonl"
    wrong_type.write_text('{"prompt": "a", "chosen": 3, "rejected": "b"}\n')
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", wrong_type, "--output", tmp_path / "o3"),
                    "line 1", "'chosen' must be a string")
    _one_line_error(dpokit("train", "--model", tmp_path / "no-such-model", "--data", train_file,
                           "--output", tmp_path / "o4"), "no-such-model", "does not exist")
    (tmp_path / "not-a-model").mkdir()
    _one_line_error(dpokit("train", "--model", tmp_path / "not-a-model", "--data", train_file,
                           "--output", tmp_path / "o5"), "not a Hugging Face model folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user's file")
    _one_line_error(dpokit("train", "--model", tiny_model_dir, "--data", train_file, "--output",
                           tmp_path / "full"), "not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user's file"
