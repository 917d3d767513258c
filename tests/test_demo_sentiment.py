"""`dpokit demo --quick` end to end, and the demo's frontier checks on hand-made points."""

import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.eval import report
from dpokit.eval.envelope import PromptFigures, frontier_gap_with_stderr
from dpokit.experiments.demo.checks import DPO, ONLINE, PREFERRED_FT, describe_checks, frontier_checks
from dpokit.experiments.demo.sentiment import DemoSettings, claim_demo_folder, run_demo
from dpokit.folder_swap import locked_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


PROMPTS = 40


def _point(method, beta, reward, kl, *, step=None, final=True, run=None, label=None):
    """A point whose figures per held-out prompt average to `reward` and `kl` (prompt-to-prompt noise
    of ±0.05 in the reward), as the demo's evaluations give them."""
    per_prompt = {"kl": [kl] * PROMPTS, "reward": [reward + (0.05 if i % 2 else -0.05) for i in range(PROMPTS)]}
    return {"method": method, "beta": beta, "reward": reward, "kl": kl, "step": step, "final": final,
            "run": run or f"{method}-{beta}-{step}", "per_prompt": per_prompt, **({"label": label} if label else {})}


BASE = [0.1] * PROMPTS


def _dpo_runs():
    """Two DPO runs along training: β 0.5 at steps 10, 20; β 0.1 at steps 10, 20 (a checkpoint below the base)."""
    return [_point(DPO, 0.5, 0.35, 1.0, step=10, final=False), _point(DPO, 0.5, 0.4, 2.0, step=20),
            _point(DPO, 0.1, 0.05, 3.0, step=10, final=False), _point(DPO, 0.1, 0.6, 6.0, step=20)]


def test_frontier_checks_compare_the_methods_upper_envelopes():
    # DPO's frontier from the base model (0, 0.1): the hull of its points is (0, 0.1), (1, 0.35), (6, 0.6)
    # ((2, 0.4) lies on that chord, (3, 0.05) far below), so 0.35 + 0.05·(x − 1) from KL 1 on.
    # Preferred-FT at (1.5, 0.3) and (2.5, 0.35): over [1.5, 2.5] DPO averages 0.40, Preferred-FT 0.325.
    sft = [_point(PREFERRED_FT, None, 0.3, 1.5, step=10, final=False), _point(PREFERRED_FT, None, 0.35, 2.5, step=20)]
    round_1 = {**_point(ONLINE, 0.1, 0.6, 6.0), "run": "online-round-1"}  # the DPO run itself: not judged
    good = frontier_checks([*_dpo_runs(), *sft, round_1, _point(ONLINE, 0.1, 0.55, 4.0, run="online-round-2")],
                           base_reward=0.1, base_per_prompt=BASE)
    gap = good.pop("frontier_gap")
    assert good == {"dpo_reward_above_base": True, "reward_rises_as_beta_falls": True,
                    "kl_grows_as_beta_falls": True, "dpo_above_preferred_ft": True, "online_above_offline": True}
    assert gap["margin"] == pytest.approx(0.40 - 0.325) and (gap["kl_start"], gap["kl_stop"]) == (1.5, 2.5)
    # Every point shares the prompts' ±0.05 pattern, so the paired difference has no spread at all.
    assert gap["stderr"] == pytest.approx(0.0, abs=1e-9)
    lines = describe_checks({**good, "frontier_gap": gap})
    assert "  [YES] Preferred-FT lies below DPO's reward–KL frontier" in lines
    assert any("DPO's frontier lies +0.075 ± 0.000 (standard error) above Preferred-FT's, on average over "
               "1.50-2.50 nats" in line for line in lines)
    # Preferred-FT above DPO's frontier where both have points: NO, with the (negative) margin.
    better_sft = [_point(PREFERRED_FT, None, 0.5, 1.5, step=10, final=False),
                  _point(PREFERRED_FT, None, 0.55, 2.5, step=20)]
    bad = frontier_checks([*_dpo_runs(), *better_sft, _point(ONLINE, 0.1, 0.45, 4.0, run="online-round-2")],
                          base_reward=0.5, base_per_prompt=[0.5] * PROMPTS)
    assert bad.pop("frontier_gap")["margin"] < 0
    assert bad == {"dpo_reward_above_base": False, "reward_rises_as_beta_falls": True,
                   "kl_grows_as_beta_falls": True, "dpo_above_preferred_ft": False, "online_above_offline": False}
    assert "  [ NO] Preferred-FT lies below DPO's reward–KL frontier" in describe_checks(bad)
    # Beyond DPO's largest KL, a point must beat DPO's best reward.
    beyond = frontier_checks([*_dpo_runs(), _point(ONLINE, 0.1, 0.59, 9.0, run="online-round-2")], 0.1, BASE)
    assert beyond["online_above_offline"] is False
    # Without Preferred-FT points, or with no KL range in common, there is no comparison.
    assert frontier_checks(_dpo_runs(), 0.1, BASE)["dpo_above_preferred_ft"] is None
    far = frontier_checks([*_dpo_runs(), _point(PREFERRED_FT, None, 0.3, 7.0, step=20)], 0.1, BASE)
    assert far["dpo_above_preferred_ft"] is None and far["frontier_gap"] is None
    assert frontier_checks(_dpo_runs()[:2], 0.1, BASE)["reward_rises_as_beta_falls"] is None


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
    # Each offline run at its checkpoints along training (every 5 of its 15 steps), then at its end.
    assert set(runs) == {"dpo-beta0.3-step5", "dpo-beta0.3-step10", "dpo-beta0.3", "preferred-ft-step5",
                         "preferred-ft-step10", "preferred-ft", "online-round-1", "online-round-2"}
    assert [runs[f"dpo-beta0.3{tail}"]["step"] for tail in ("-step5", "-step10", "")] == [5, 10, 15]
    assert [runs[f"preferred-ft{tail}"]["final"] for tail in ("-step5", "-step10", "")] == [False, False, True]
    for run in summary["runs"]:
        assert {"method", "beta", "reward", "kl", "base_reward"} <= set(run)
        assert run["base_reward"] == summary["base_reward"]
    for name in ("dpo-beta0.3", "preferred-ft"):
        folder = out / "runs" / name
        assert (folder / "model.safetensors").is_file() and (folder / "training_curves.png").is_file()
        # The checkpoints along training were evaluated and removed; the final one stays, as in any run.
        assert [c.name for c in (folder / "checkpoints").iterdir()] == ["step-0000015"]
    # A checkpoint along training is evaluated exactly as the final model: the same samples per prompt.
    assert [runs[f"dpo-beta0.3{tail}"]["samples_per_prompt"] for tail in ("-step5", "")] == [2, 2]
    # The frontiers' comparison is printed from the data, and summary.json holds what recomputes it.
    gap = summary["checks"]["frontier_gap"]
    per_prompt = summary["per_prompt"]
    figures = {method: [PromptFigures(per_prompt["runs"][r["run"]]["kl"], per_prompt["runs"][r["run"]]["reward"])
                        for r in summary["runs"] if r["method"] == method] for method in (DPO, PREFERRED_FT)}
    again = frontier_gap_with_stderr(figures[DPO], figures[PREFERRED_FT], per_prompt["base_reward"])
    assert (again.margin, again.stderr) == (gap["margin"], gap["stderr"])
    mark = "YES" if gap["margin"] > 0 else " NO"
    assert f"[{mark}] Preferred-FT lies below DPO's reward–KL frontier" in printed
    assert f"DPO's frontier lies {gap['margin']:+.3f} ± {gap['stderr']:.3f} (standard error)" in printed
    assert (out / "online" / "round-2" / "model.safetensors").is_file()
    # The point of the demo: DPO raises the judged reward on held-out prompts at the fixed seed.
    assert runs["dpo-beta0.3"]["reward"] > summary["base_reward"]
    assert runs["dpo-beta0.3"]["kl"] > 0
    # The shared point says in the picture that online round 1 is this DPO run.
    assert runs["dpo-beta0.3"]["label"] == "β=0.3 = online round 1" and runs["online-round-1"]["label"] == ""
    # `dpokit runs` finds every trained run below the demo's folder, with its judged figures.
    assert main(["runs", str(out), "--json"]) == 0
    listed = {Path(r["run"]).relative_to(out).as_posix(): r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"runs/dpo-beta0.3", "runs/preferred-ft", "online/round-2"}
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
                        betas=(1.0, 0.3), steps=2, batch_size=8, sft_steps=2, online_rounds=1, online_beta=1.0)
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
    runs = ["dpo-beta1", "dpo-beta0.3", "preferred-ft"]
    assert sorted(plotted) == sorted(tmp_path / "demo" / "runs" / r / "training_curves.png" for r in runs)
    for run in runs:
        assert "## Evaluation: judged" in (tmp_path / "demo" / "runs" / run / "report.md").read_text()
