"""Reference strategies and the on-disk cache: precomputed == live, every layout trains alike,
the cache is reused exactly when weights, data and dtype match, and a bad file is recomputed."""

import math

import pytest
import torch
from safetensors.torch import save_file

from dpokit.config import build_config
from dpokit.data.tokenize import TokenizedPair
from dpokit.model.reference import cache_path, data_fingerprint, load_cache, save_cache
from dpokit.train.loop import train
from helpers.toy import make_pairs, save_tiny_model, write_jsonl


def _run(model_dir, data, out, log=None, **speed):
    cfg = build_config({
        "model": {"model": str(model_dir)},
        "data": {"data": str(data), "max_length": 32},
        "train": {"output": str(out), "learning_rate": 1e-3, "progress": "off", "batch_size": 4,
                  "max_steps": 3, "lr_scheduler": "constant", "overwrite": True},
        "speed": {k: v for k, v in speed.items() if k not in ("dtype", "gradient_checkpointing")},
        "scale": {"gradient_checkpointing": speed.get("gradient_checkpointing", False)},
    } | ({"model": {"model": str(model_dir), "dtype": speed["dtype"]}} if "dtype" in speed else {}))
    lines = []
    result = train(cfg, log=lines.append if log is None else log)
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(out).state_dict()
    return [r["loss"] for r in result.history], weights, lines


@pytest.mark.slow
def test_precomputed_live_and_every_layout_train_alike(tiny_model_dir, tmp_path, same_training):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(12, seed=3))
    base_losses, base_weights, _ = _run(tiny_model_dir, data, tmp_path / "live", reference="live",
                                        layout="padded", lm_head="plain")
    assert base_losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for speed in ({"layout": "padded"}, {"layout": "packed"}, {"layout": "prefix-shared"}, {},
                  {"layout": "packed", "reference": "live", "lm_head": "chunked"},
                  {"layout": "prefix-shared", "gradient_checkpointing": True}):
        losses, weights, _ = _run(tiny_model_dir, data, tmp_path / "r", **speed)
        same_training(weights, base_weights, losses=(losses, base_losses))  # float noise x Adam: see conftest


def test_cache_is_reused_only_for_the_same_weights_data_and_dtype(tmp_path):
    model_a = save_tiny_model(tmp_path / "a", seed=0)
    model_b = save_tiny_model(tmp_path / "b", seed=1)
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(8, seed=3))
    other_data = write_jsonl(tmp_path / "e.jsonl", make_pairs(8, seed=4))
    cache = tmp_path / "cache"

    def reference_lines(model, data_file, **speed):
        _, _, lines = _run(model, data_file, tmp_path / "run", reference_cache=str(cache), **speed)
        return [line for line in lines if line.startswith("reference log-probs")]

    first = reference_lines(model_a, data)
    assert len(first) == 1 and "computed" in first[0]
    assert "reused" in reference_lines(model_a, data)[0]  # same model and data: a resumed run, a sweep
    assert "reused" in reference_lines(model_a, data, layout="prefix-shared")[0]  # layouts are equivalent
    assert "computed" in reference_lines(model_b, data)[0]  # other weights
    assert "computed" in reference_lines(model_a, other_data)[0]  # other data
    assert "reused" in reference_lines(model_a, data, lm_head="plain")[0]  # equivalent head: same key
    assert "computed" in reference_lines(model_a, data, dtype="bf16")[0]  # other precision
    files = sorted(cache.iterdir())
    assert len(files) == 4 and all(f.suffix == ".safetensors" for f in files)  # no temporary files left


def test_a_corrupt_or_mismatched_cache_is_recomputed_not_trusted(tmp_path):
    pairs = [TokenizedPair((1, 2), (3, 4), (5,), 0), TokenizedPair((1, 6), (7,), (8, 9), 1)]
    fingerprint = {"version": "1", "weights": "w", "dtype": "fp32", "data": data_fingerprint(pairs)}
    path = cache_path(tmp_path, fingerprint)
    assert load_cache(path, fingerprint, 2) == "no cache file yet"
    save_cache(path, torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]), fingerprint)
    chosen, rejected, computed = load_cache(path, fingerprint, 2)
    assert chosen.tolist() == [-1.0, -2.0] and rejected.tolist() == [-3.0, -4.0] and computed.all()
    assert load_cache(path, {**fingerprint, "dtype": "bf16"}, 2) == "its fingerprint does not match"
    assert load_cache(path, fingerprint, 3) == "its contents do not fit the data"
    path.write_bytes(path.read_bytes()[:20])
    assert load_cache(path, fingerprint, 2).startswith("it cannot be read")
    # A file with the right name but a pickle-free foreign payload and no fingerprint: rejected.
    save_file({"chosen": torch.zeros(2), "rejected": torch.zeros(2)}, str(path))
    assert load_cache(path, fingerprint, 2) == "its fingerprint does not match"
    assert data_fingerprint(pairs) != data_fingerprint(pairs[::-1])
    assert data_fingerprint(pairs) != data_fingerprint([TokenizedPair((1, 2, 3), (4,), (5,), 0), pairs[1]])
