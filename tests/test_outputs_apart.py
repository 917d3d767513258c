"""Outputs never land on inputs (issue 21.1), and --overwrite leaves nothing of the old run (22.1)."""

from __future__ import annotations

import os
import shutil

import pytest

from dpokit import cli
from dpokit.errors import DpokitError
from dpokit.experiments.frontier import replace_root
from dpokit.paths import check_creatable, check_outputs_apart, clear_for_overwrite

TRAIN = ["--max-steps", "1", "--max-length", "32", "--progress", "off"]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_over_its_own_model_leaves_the_model_untouched(tiny_model_dir, toy_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _snapshot(model)
    code = cli.main(["train", "--model", str(model), "--data", str(toy_data[0]), "--output", str(model),
                     "--overwrite", *TRAIN])
    assert code == 2 and "never writes over its own inputs" in capsys.readouterr().err
    assert _snapshot(model) == before


def test_sample_onto_its_prompts_leaves_them_untouched(tiny_model_dir, toy_data, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(toy_data[0].read_text())
    before = prompts.read_bytes()
    code = cli.main(["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output",
                     str(prompts), "--max-new-tokens", "2"])
    assert code == 2 and "is --prompts" in capsys.readouterr().err
    assert prompts.read_bytes() == before


def test_overwrite_leaves_nothing_of_the_previous_run(tiny_model_dir, toy_data, tmp_path):
    """A LoRA run's adapter beside a full model would load as base + old adapter."""
    out = tmp_path / "run"
    out.mkdir()
    for stale in ("adapter_config.json", "adapter_model.safetensors", "notes.txt"):
        (out / stale).write_text("{}")
    (out / "checkpoints" / "step-0000009").mkdir(parents=True)
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
                     "--overwrite", *TRAIN])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "notes.txt"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]

    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "adapter_config.json").write_text("{}")
    assert cli.main(["export", str(out), "--output", str(exported), "--overwrite"]) == 0
    assert not (exported / "adapter_config.json").exists() and (exported / "model.safetensors").is_file()


def test_sweep_and_online_root_is_replaced_by_overwrite(tmp_path):
    from dpokit.config import RunConfig
    from dpokit.folder_swap import held_entries, locked_folder

    cfg = RunConfig()
    cfg.train.output, cfg.train.overwrite = str(tmp_path / "sweep"), True
    (tmp_path / "sweep" / "old-run").mkdir(parents=True)
    (tmp_path / "sweep" / "frontier.csv").write_text("run\n")
    with locked_folder(cfg.train.output) as lock, replace_root(cfg, lock, print) as root:
        assert held_entries(root.folder) == []  # the new root, empty; the old one waits beside it
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["sweep"]  # committed: the old one is gone


def test_overwrite_never_deletes_where_you_stand(tmp_path, monkeypatch):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "file").write_text("x")
    monkeypatch.chdir(tmp_path / "inside")
    for folder in (tmp_path / "inside", tmp_path):
        with pytest.raises(DpokitError, match="would delete the current folder"):
            clear_for_overwrite(folder)
    assert (tmp_path / "inside" / "file").exists()


def test_relations_resolve_symlinks_and_dotdot(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    check_outputs_apart([("--output", tmp_path / "c")], [("--model", tmp_path / "a")])  # apart: fine
    check_outputs_apart([("--output", tmp_path / "a")], [("--model", "no-such-hub/id")])  # not local: fine
    for output, relation in ((tmp_path / "link", "is"), (tmp_path / "link" / "x", "lies inside"),
                             (tmp_path / "a" / ".." / "a" / "b", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(DpokitError, match=f" {relation} --model "):
            check_outputs_apart([("--output", output)], [("--model", tmp_path / "a")])
    with pytest.raises(DpokitError, match="is --data"):  # FOLDER:SPLIT names FOLDER
        check_outputs_apart([("--output", tmp_path / "a")], [("--data", f"{tmp_path / 'a'}:train")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_place_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DpokitError, match="--output .*cannot be created \\(no permission"):
            check_creatable(locked / "run", "--output")
    finally:
        locked.chmod(0o700)
