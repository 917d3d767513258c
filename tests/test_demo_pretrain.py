"""`python -m dpokit.experiments.demo.pretrain` end to end on a tiny corpus and model, into a tmp folder."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.experiments.demo.bundled import load_base_model, verify_base_model
from dpokit.experiments.demo.pretrain import main

TINY = ["--reviews", 300, "--held-out-reviews", 40, "--tokenizer-reviews", 300, "--vocab-size", 400,
        "--hidden-size", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1, "--intermediate-size", 64,
        "--block-size", 32, "--batch-size", 4, "--warmup-steps", 2, "--log-every", 3, "--seed", 5]


def run_main(*args) -> int:
    return main([str(a) for a in args])


def test_pretrain_entry_point_writes_a_verified_loadable_model_folder(tmp_path):
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpokit.experiments.demo.pretrain", "--output", str(out), "--steps", "6",
                           "--samples", "2", *map(str, TINY)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 3/6" in proc.stdout and "step 6/6" in proc.stdout
    manifest = verify_base_model(out)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["corpus"]["seed"] == 5 and manifest["corpus"]["reviews"] == 300
    assert manifest["training"]["steps"] == 6 and manifest["training"]["tokens_seen"] == 6 * 4 * 32
    for key in ("final_train_loss", "held_out_loss", "unigram_cross_entropy"):
        assert math.isfinite(manifest["training"][key]) and manifest["training"][key] > 0
    assert manifest["model_config"]["hidden_size"] == 32 and manifest["model_config"]["num_hidden_layers"] == 1
    assert len(manifest["samples"]["texts"]) == 2
    model, tokenizer = load_base_model(out)
    assert model.config.vocab_size == len(tokenizer) == manifest["model_config"]["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert tokenizer("The film")["input_ids"][0] == tokenizer.bos_token_id


def test_same_seed_same_model_and_a_full_folder_is_refused(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_main("--output", first, "--steps", 2, "--samples", 0, *TINY) == 0
    assert run_main("--output", second, "--steps", 2, "--samples", 0, *TINY) == 0
    a, b = (json.loads((f / "MANIFEST.json").read_text()) for f in (first, second))
    assert a["corpus"]["sha256"] == b["corpus"]["sha256"]
    assert a["files"]["tokenizer.json"] == b["files"]["tokenizer.json"]
    assert a["training"]["held_out_loss"] == b["training"]["held_out_loss"]
    model_a, _ = load_base_model(first)
    model_b, _ = load_base_model(second)
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name

    capsys.readouterr()
    assert run_main("--output", first, "--steps", 2, "--samples", 0, *TINY) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    (first / "stale.bin").write_text("from an earlier model")
    assert run_main("--output", first, "--steps", 2, "--samples", 0, "--overwrite", *TINY[:-1], 6) == 0
    assert not (first / "stale.bin").exists()  # --overwrite leaves nothing of the old model
    assert json.loads((first / "MANIFEST.json").read_text())["corpus"]["seed"] == 6
    verify_base_model(first)

    # Verification names the file that does not match, or is missing.
    config = first / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"num_hidden_layers": 1', '"num_hidden_layers": 2'))
    with pytest.raises(DpokitError, match=r"config\.json: sha256 .* does not match MANIFEST\.json"):
        verify_base_model(first)
    config.write_text(original)
    (first / "tokenizer.json").unlink()
    with pytest.raises(DpokitError, match="tokenizer.json: listed in MANIFEST.json but missing"):
        load_base_model(first)
    (first / "MANIFEST.json").unlink()
    with pytest.raises(DpokitError, match="MANIFEST.json: missing"):
        verify_base_model(first)
