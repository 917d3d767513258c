"""Every registered loss trains end to end through the CLI entry point on the tiny model."""

import pytest
import torch
from safetensors.torch import load_file

from dpokit import cli
from dpokit.losses import LOSSES
from dpokit.model import load as models

CASES = [(name, []) for name in sorted(LOSSES)] + [("sigmoid,sft", ["--loss-weights", "1,0.5"])]


def _extra(name):
    # exo_pair is undefined at ε = 0; give it the small ε its paper uses.
    return ["--label-smoothing", "0.001"] if name == "exo_pair" else []


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_loss_trains_through_the_cli(name, extra, tiny_model_dir, toy_data, tmp_path, monkeypatch, capsys):
    reference_built = []
    real_frozen = models.frozen_reference
    monkeypatch.setattr(models, "frozen_reference", lambda m: reference_built.append(1) or real_frozen(m))
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
                     "--loss", name, "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3",
                     "--max-length", "32", "--progress", "off", *extra, *_extra(name)])
    assert code == 0, capsys.readouterr().err
    history = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "NaN" not in "".join(history) and "Infinity" not in "".join(history)
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    needs = any(LOSSES[n].needs_reference for n in name.split(","))
    # By default a reference-based loss gets precomputed reference log-probs (a cache file, and no
    # second model); a reference-free loss gets neither a cache nor a model.
    assert not reference_built
    assert any((out / "reference-cache").glob("*.safetensors")) == needs


def test_live_reference_is_built_only_when_asked(tiny_model_dir, toy_data, tmp_path, monkeypatch, capsys):
    built = []
    real_frozen = models.frozen_reference
    monkeypatch.setattr(models, "frozen_reference", lambda m: built.append(1) or real_frozen(m))
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output",
                     str(tmp_path / "run"), "--reference", "live", "--max-steps", "1", "--batch-size", "4",
                     "--max-length", "32", "--progress", "off"])
    assert code == 0, capsys.readouterr().err
    assert built == [1] and not (tmp_path / "run" / "reference-cache").exists()
