"""`dpokit demo --quick` end to end, and the demo's frontier checks on hand-made points."""

import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.eval import report
from dpokit.experiments.demo.sentiment import (
    DPO,
    ONLINE,
    PREFERRED_FT,
    DemoSettings,
    claim_demo_folder,
    frontier_checks,
    run_demo,
)
from dpokit.folder_swap import locked_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _point(method, beta, reward, kl, label=None):
    return {"method": method, "beta": beta, "reward": reward, "kl": kl, **({"label": label} if label else {})}


def test_frontier_checks_on_hand_made_points():
    dpo = [_point(DPO, 0.5, 0.4, 2.0), _point(DPO, 0.1, 0.6, 6.0)]
    # DPO's frontier through (0, 0.1), (2, 0.4), (6, 0.6): at KL 4 it is 0.5.
    round_1 = {**_point(ONLINE, 0.1, 0.6, 6.0), "run": "online-round-1"}  # the DPO run itself: not judged
    good = frontier_checks([*dpo, _point(PREFERRED_FT, None, 0.45, 4.0), round_1,
                            _point(ONLINE, 0.1, 0.55, 4.0, "round 2")], base_reward=0.1)
    assert good == {"dpo_reward_above_base": True, "reward_rises_as_beta_falls": True,
                    "kl_grows_as_beta_falls": True, "dpo_above_preferred_ft": True, "online_above_offline": True}
    bad = frontier_checks([*dpo, _point(PREFERRED_FT, None, 0.55, 4.0), _point(ONLINE, 0.1, 0.45, 4.0, "round 2")],
                          base_reward=0.5)
    assert bad == {"dpo_reward_above_base": False, "reward_rises_as_beta_falls": True,
                   "kl_grows_as_beta_falls": True, "dpo_above_preferred_ft": False, "online_above_offline": False}
    # Beyond DPO's largest KL, a point must beat DPO's best reward.
    assert frontier_checks([*dpo, _point(ONLINE, 0.1, 0.59, 9.0, "round 2")], 0.1)["online_above_offline"] is False
    assert frontier_checks(dpo[:1], 0.1)["reward_rises_as_beta_falls"] is None


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    # An earlier demo's folder, with a run this one does not make (an earlier --full's β): emptied first.
    stale = out / "runs" / "dpo-beta0.5"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"old")
    (out / "demo.log").write_text("an earlier run\n")
    (tmp_path / "beside.txt").write_text("mine")
    assert main(["demo", "--quick", "--output", str(out), "--progress", "off"]) == 0
    printed = capsys.readouterr().out
    assert "what the numbers show" in printed and "before (base model)" in printed
    assert f"replacing {out}: it held an earlier dpokit demo run" in printed
    assert not stale.exists() and (tmp_path / "beside.txt").read_text() == "mine"
    assert "an earlier run" not in (out / "demo.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"dpo-beta0.3", "preferred-ft-15steps", "online-round-1", "online-round-2"}
    for run in summary["runs"]:
        assert {"method", "beta", "reward", "kl", "base_reward"} <= set(run)
        assert run["base_reward"] == summary["base_reward"]
    for name in ("dpo-beta0.3", "preferred-ft-15steps"):
        folder = out / "runs" / name
        assert (folder / "model.safetensors").is_file() and (folder / "training_curves.png").is_file()
    assert (out / "online" / "round-2" / "model.safetensors").is_file()
    # The point of the demo: DPO raises the judged reward on held-out prompts at the fixed seed.
    assert runs["dpo-beta0.3"]["reward"] > summary["base_reward"]
    assert runs["dpo-beta0.3"]["kl"] > 0
    # The shared point says in the picture that online round 1 is this DPO run.
    assert runs["dpo-beta0.3"]["label"] == "β=0.3 = online round 1" and runs["online-round-1"]["label"] == ""
    # `dpokit runs` finds every trained run below the demo's folder, with its judged figures.
    assert main(["runs", str(out), "--json"]) == 0
    listed = {Path(r["run"]).relative_to(out).as_posix(): r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"runs/dpo-beta0.3", "runs/preferred-ft-15steps", "online/round-2"}
    assert listed["runs/dpo-beta0.3"]["judged_reward"] == runs["dpo-beta0.3"]["reward"]


def _earlier_demo(folder: Path) -> None:
    (folder / "runs" / "dpo-beta0.5").mkdir(parents=True)
    (folder / "runs" / "dpo-beta0.5" / "model.safetensors").write_bytes(b"old")
    (folder / "demo.log").write_text("old\n")
    (folder / "summary.json").write_text("{}")
    (folder / ".summary.json.k2x9_a.tmp").write_text("{")  # an atomic write the earlier run did not finish


def _claim(folder: Path, log) -> None:
    with locked_folder(folder) as lock, claim_demo_folder(lock, log):
        pass


def test_an_earlier_demo_folder_is_replaced_and_any_other_refused(tmp_path):
    lines = []
    earlier = tmp_path / "earlier"
    _earlier_demo(earlier)
    (tmp_path / "beside.txt").write_text("mine")
    _claim(earlier, lines.append)
    assert [p.name for p in earlier.iterdir()] == [".dpokit.lock"]
    assert lines == [f"replacing {earlier}: it held an earlier dpokit demo run, which is kept beside it until this "
                     "demo's first run has a checkpoint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "earlier"]
    assert (tmp_path / "beside.txt").read_text() == "mine"
    # New and empty folders: nothing to say.
    _claim(tmp_path / "new", lines.append)
    _claim(earlier, lines.append)
    assert len(lines) == 1
    # A user's folder, and an earlier demo's with a user's file added: refused, nothing deleted.
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    mixed = tmp_path / "mixed"
    _earlier_demo(mixed)
    (mixed / "notes.txt").write_text("keep")
    for folder in (users, mixed):
        with pytest.raises(DpokitError, match=f"--output {folder} is not empty; the demo writes into"):
            _claim(folder, lines.append)
        assert (folder / "notes.txt").read_text() == "keep"
    assert (mixed / "runs" / "dpo-beta0.5" / "model.safetensors").is_file() and len(lines) == 1


def test_the_demo_refuses_a_folder_that_is_not_a_demo_s_before_any_work(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    assert main(["demo", "--quick", "--output", str(folder), "--progress", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dpokit: error: --output {folder} is not empty") and "\n" not in err
    assert sorted(p.name for p in folder.iterdir()) == [".dpokit.lock", "notes.txt"]


def test_a_thread_count_below_one_is_a_one_line_error_before_any_work(tmp_path, capsys):
    folder = tmp_path / "out"
    assert main(["demo", "--quick", "--threads", "0", "--output", str(folder), "--progress", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpokit: error: --threads must be at least 1; got 0"
    assert not folder.exists()


def test_offline_runs_share_one_reference_cache_and_write_one_report_each(tmp_path, monkeypatch):
    plotted = []
    curves = report.plot_training_curves
    monkeypatch.setattr(report, "plot_training_curves", lambda records, path: plotted.append(path) or curves(records, path))
    tiny = DemoSettings(train_prompts=8, eval_prompts=4, samples_per_prompt=3, eval_samples=1, max_new_tokens=8,
                        betas=(1.0, 0.3), steps=2, batch_size=8, sft_steps=(2,), online_rounds=1, online_beta=1.0)
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(tiny.threads + 1)
    try:
        result = run_demo(tiny, tmp_path / "demo", online=False, log=lambda _: None)
        assert torch.get_num_threads() == tiny.threads + 1  # the demo ran on its own setting, then gave it back
    finally:
        torch.set_num_threads(callers_threads)
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "demo" / "demo.log").read_text().splitlines()]
    reference_lines = [line for line in lines if line.startswith("reference log-probs of")]
    pairs = result.summary["pairs"]["pairs"]
    cache = tmp_path / "demo" / "reference-cache"
    # β = 1 computes them into the demo's one cache, β = 0.3 computes none; Preferred-FT needs none.
    assert len(reference_lines) == 2 and f"computed {pairs} " in reference_lines[0]
    assert reference_lines[1].startswith(f"reference log-probs of {pairs} pairs: reused {cache}")
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert not list((tmp_path / "demo" / "runs").glob("*/reference-cache"))
    # One report per run, written after its evaluation (it shows the judged figures).
    runs = ["dpo-beta1", "dpo-beta0.3", "preferred-ft-2steps"]
    assert sorted(plotted) == sorted(tmp_path / "demo" / "runs" / r / "training_curves.png" for r in runs)
    for run in runs:
        assert "## Evaluation: judged" in (tmp_path / "demo" / "runs" / run / "report.md").read_text()
