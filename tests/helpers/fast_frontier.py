"""A FrontierRunner that trains for real but evaluates nothing: for tests of what the runs do, not
of their evaluation, report or picture."""

from __future__ import annotations

import dpokit.experiments.frontier as frontier


def fast_frontier(monkeypatch) -> None:
    """Each run's evaluation becomes a fixed row; its report and the frontier picture are skipped."""
    def evaluate(self, run_dir, name, *args, **kwargs):
        row = {"run": name, "reward": 0.0, "reward_stderr": 0.0, "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5}
        self.reference_row = dict(row, run="reference")
        return frontier.RunEvaluation(row, {})

    monkeypatch.setattr(frontier.FrontierRunner, "evaluate", evaluate)
    monkeypatch.setattr(frontier, "report_after_training", lambda *a, **k: None)
    monkeypatch.setattr(frontier, "plot_frontier", lambda *a, **k: None)
