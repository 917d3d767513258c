"""`dpokit demo --quick` end to end, and the demo's frontier checks on hand-made points."""

import json
from pathlib import Path

from dpokit.cli import main
from dpokit.experiments.demo.sentiment import DPO, ONLINE, PREFERRED_FT, frontier_checks

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
    assert main(["demo", "--quick", "--output", str(out), "--progress", "off"]) == 0
    printed = capsys.readouterr().out
    assert "what the numbers show" in printed and "before (base model)" in printed
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
