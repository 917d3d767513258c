"""The comparison the invariance tests use for two training runs (`conftest.assert_same_training`)
can fail: runs whose gradients differ (another data order, another learning rate) violate it, a
run that differs only in float reduction order (another batch layout) does not. Catches: a
comparison that holds for any two AdamW runs (the drift bound it replaced)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import assert_same_training
from dpokit.config import build_config
from dpokit.train.loop import train


def _run(model_dir, data, out, layout="padded", **train_opts):
    section = {"output": str(out), "batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "progress": "off",
               "lr_scheduler": "constant", **train_opts}
    result = train(build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                                 "train": section, "speed": {"layout": layout}}), log=lambda _: None)
    return load_file(str(out / "model.safetensors")), [r["loss"] for r in result.history if "loss" in r]


@pytest.mark.slow  # four short training runs: ~10 s on 2 loaded cores
def test_runs_with_other_gradients_fail_the_comparison_and_a_float_different_run_passes(
        tiny_model_dir, toy_data, tmp_path):
    weights, losses = _run(tiny_model_dir, toy_data[0], tmp_path / "base")
    packed, packed_losses = _run(tiny_model_dir, toy_data[0], tmp_path / "packed", layout="packed")
    assert_same_training(packed, weights, losses=(packed_losses, losses))
    for name, opts in (("another seed", {"seed": 43}), ("another learning rate", {"learning_rate": 2e-3})):
        other, other_losses = _run(tiny_model_dir, toy_data[0], tmp_path / name.replace(" ", "_"), **opts)
        with pytest.raises(AssertionError, match="coordinates differ"):
            assert_same_training(other, weights)  # the weights alone
        with pytest.raises(AssertionError):
            assert_same_training(weights, weights, losses=(other_losses, losses))  # the losses alone
