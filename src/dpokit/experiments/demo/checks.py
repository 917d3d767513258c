"""What the demo's numbers show, measured: its checks, its table and the lines that say them.

Every point is a dict with `method`, `reward`, `kl` (and `beta` for DPO); a run's points along its
training carry its `run_name` and `step`, its last one `final: True`. Points compared on the
frontier also carry `per_prompt` ({"kl": [...], "reward": [...]}, one figure per held-out prompt),
so a difference between methods gets a standard error from the same prompts.
"""

from __future__ import annotations

from dataclasses import asdict

from dpokit.eval.envelope import PromptFigures, envelope_at, frontier, frontier_gap_with_stderr

DPO, PREFERRED_FT, ONLINE = "DPO", "Preferred-FT", "online DPO"


def final_points(points: list[dict], method: str) -> list[dict]:
    """Each run's last point (the trained model) of `method`."""
    return [p for p in points if p["method"] == method and p.get("final", True)]


def frontier_checks(points: list[dict], base_reward: float, base_per_prompt: list[float] | None = None) -> dict:
    """The demo's claims: each True/False (None when the points needed are missing), and
    `frontier_gap`: how far DPO's frontier lies above Preferred-FT's, with its standard error."""
    dpo_final = sorted(final_points(points, DPO), key=lambda p: -p["beta"])  # β falling
    dpo = [p for p in points if p["method"] == DPO]
    sft = [p for p in points if p["method"] == PREFERRED_FT]
    later_rounds = [p for p in points if p["method"] == ONLINE and p.get("run") != "online-round-1"]
    checks: dict = {
        "dpo_reward_above_base": all(p["reward"] > base_reward for p in dpo_final) if dpo_final else None,
        "reward_rises_as_beta_falls": _increasing([p["reward"] for p in dpo_final]) if len(dpo_final) > 1 else None,
        "kl_grows_as_beta_falls": _increasing([p["kl"] for p in dpo_final]) if len(dpo_final) > 1 else None,
    }
    gap = None
    if dpo and sft and base_per_prompt is not None:
        gap = frontier_gap_with_stderr([_figures(p) for p in dpo], [_figures(p) for p in sft], base_per_prompt)
    checks["dpo_above_preferred_ft"] = None if gap is None else gap.margin > 0
    checks["frontier_gap"] = None if gap is None else asdict(gap)
    # Online rounds against DPO's frontier (from the base model, flat after its best point): above it
    # at their KL, or beyond its KL range above its best.
    envelope = frontier([(p["kl"], p["reward"]) for p in dpo], (0.0, base_reward)) if dpo else []
    checks["online_above_offline"] = (all(p["reward"] > envelope_at(envelope, max(p["kl"], 0.0)) for p in later_rounds)
                                      if dpo and later_rounds else None)
    return checks


def _figures(point: dict) -> PromptFigures:
    return PromptFigures(kl=point["per_prompt"]["kl"], reward=point["per_prompt"]["reward"])


def _increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


CHECK_TEXTS = {
    "dpo_reward_above_base": "every DPO run's held-out reward is above the base model's",
    "reward_rises_as_beta_falls": "the reward rises as β falls",
    "kl_grows_as_beta_falls": "the KL to the base model grows as β falls",
    "dpo_above_preferred_ft": "Preferred-FT lies below DPO's reward–KL frontier",
    "online_above_offline": "online rounds lie above the offline DPO frontier",
}


def describe_checks(checks: dict) -> list[str]:
    marks = {True: "YES", False: "NO", None: "n/a"}
    lines = ["what the numbers show:"]
    for key, text in CHECK_TEXTS.items():
        lines.append(f"  [{marks[checks.get(key)]:>3}] {text}")
        if key == "dpo_above_preferred_ft" and checks.get("frontier_gap"):
            lines.append(f"        {describe_gap(checks['frontier_gap'])}")
    return lines


def describe_gap(gap: dict) -> str:
    """One line: the mean gap, its standard error, over which KL range, and whether it is clear of noise."""
    margin, stderr = gap["margin"], gap["stderr"]
    side = "above" if margin > 0 else "below"
    clear = "more than" if abs(margin) > 2 * stderr else "within"
    return (f"DPO's frontier lies {margin:+.3f} ± {stderr:.3f} (standard error) {side} Preferred-FT's, on average "
            f"over {gap['kl_start']:.2f}-{gap['kl_stop']:.2f} nats where both have points; {clear} two standard "
            "errors of 0")


def format_demo_table(points: list[dict], base_reward: float) -> str:
    """One row per point: the runs' checkpoints along training, then their final models."""
    lines = [f"{'run':<24} {'method':<13} {'β':>5} {'step':>5} {'reward':>14} {'KL (nats)':>14} {'win rate':>9}",
             f"{'base model':<24} {'-':<13} {'-':>5} {0:>5} {base_reward:>+14.3f} {0.0:>14.2f} {0.5:>9.2f}"]
    for p in points:
        beta = f"{p['beta']:g}" if p.get("beta") is not None else "-"
        step = str(p["step"]) if p.get("step") is not None else "-"
        reward = f"{p['reward']:+.3f} ± {p['reward_stderr']:.3f}"
        kl = f"{p['kl']:.2f} ± {p['kl_stderr']:.2f}"
        lines.append(f"{p['run']:<24} {p['method']:<13} {beta:>5} {step:>5} {reward:>14} {kl:>14} "
                     f"{p['win_rate']:>9.2f}")
    return "\n".join(lines)
