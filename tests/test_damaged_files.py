"""A damaged checkpoint file gets a named one-line error, with the checkpoint to fall back to (issue 21.3)."""

from __future__ import annotations

from dpokit import cli


def test_damaged_checkpoint_files_are_named_with_the_last_good_one(tiny_model_dir, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
            "--max-steps", "2", "--save-every", "1", "--max-length", "32", "--progress", "off"]
    assert cli.main(argv) == 0
    first, second = out / "checkpoints" / "step-0000001", out / "checkpoints" / "step-0000002"
    capsys.readouterr()
    for name, damage in (("training_state.pt", b"garbage"), ("model.safetensors", b"\x00" * 64)):
        original = (second / name).read_bytes()
        (second / name).write_bytes(damage)
        assert cli.main([*argv, "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{second / name} is damaged" in err and f"--resume {first}" in err, err
        (second / name).write_bytes(original)
    (first / "training_state.pt").write_bytes(b"")  # the oldest has nothing to fall back to
    assert cli.main([*argv, "--resume", str(first)]) == 2
    assert "no earlier checkpoint exists" in capsys.readouterr().err


def test_a_damaged_run_config_is_named_in_one_line(tmp_path, capsys):
    """`export --merge` reads the LoRA run's dpokit_config.yaml for its base model: a damaged one is
    named, not a YAML traceback (nothing is loaded before that read)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}', encoding="utf-8")
    (run / "dpokit_config.yaml").write_text("model: {model: [unclosed\n", encoding="utf-8")
    assert cli.main(["export", str(run), "--output", str(tmp_path / "out"), "--merge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{run / 'dpokit_config.yaml'}: not a readable run config" in err, err
