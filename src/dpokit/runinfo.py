"""What a finished run folder says about itself: one reader for `dpokit runs` and the model card.

A run folder holds `dpokit_config.yaml` (the resolved config), `metrics.jsonl` (one record per
logged step; held-out records carry `eval_` keys), `run_summary.json` (wall time and the data
counts, written when training ends) and, once evaluated, `evaluation.json`. Each is optional
here: a folder from an older dpokit, or one still training, shows what it has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.config import LOSS_KINDS
from dpokit.errors import DpokitError
from dpokit.folder_swap import HALF_SUFFIX, SWAP_SUFFIX, standing
from dpokit.io import RUN_CONFIG_FILE, atomic_write_text, read_run_config

RUN_SUMMARY_FILE = "run_summary.json"
EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunInfo:
    """One run folder, read: every figure is None where the folder does not hold it."""

    folder: Path
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_train: dict[str, Any] = field(default_factory=dict)  # the last metrics record with a loss
    last_eval: dict[str, Any] = field(default_factory=dict)  # the last record with eval_ figures
    evaluation: dict[str, Any] = field(default_factory=dict)  # evaluation.json
    summary: dict[str, Any] = field(default_factory=dict)  # run_summary.json

    def setting(self, section: str, name: str) -> Any:
        return (self.config.get(section) or {}).get(name)

    def _beta_counts(self) -> bool:
        """False for a run whose losses all ignore β (sft, orpo): its β changed nothing."""
        names = _loss_names(self.setting("loss", "loss")) or ["sigmoid"]
        return not all(name in LOSS_KINDS and not LOSS_KINDS[name].uses_beta for name in names)

    def row(self) -> dict[str, Any]:
        """The figures `dpokit runs` shows, by column name."""
        judged, kl = self.evaluation.get("judged") or {}, self.evaluation.get("kl") or {}
        return {
            "run": str(self.folder),
            "model": self.setting("model", "model"),
            "loss": _as_text(self.setting("loss", "loss")),
            "beta": self.setting("loss", "beta") if self._beta_counts() else None,
            "lora": self.setting("lora", "lora_r") or None,  # 0: every weight trained
            "steps": self.last_train.get("step"),
            "loss_final": self.last_train.get("loss"),
            "reward_accuracy": self.last_train.get("rewards/accuracies"),
            "eval_loss": self.last_eval.get("eval_loss"),
            "eval_reward_accuracy": self.last_eval.get("eval_rewards/accuracies"),
            "judged_reward": judged.get("reward_policy"),
            "win_rate": judged.get("win_rate"),
            "kl": kl.get("kl"),
            "wall_s": self.summary.get("wall_seconds"),
        }


def _loss_names(value: Any) -> list[str]:
    return [name.strip() for name in (_as_text(value) or "").split(",") if name.strip()]


def _as_text(value: Any) -> Any:
    """A combined loss reads the same whether the config held a list or a comma string."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _run_config(folder: Path) -> dict[str, Any]:
    """The run's config; a damaged one reads as empty, so one bad folder does not hide the others."""
    try:
        return read_run_config(folder) or {}
    except DpokitError:
        return {}


def _last_records(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last training record and the last held-out record of metrics.jsonl (a line cut short
    by a crash is passed over)."""
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return last_train, last_eval
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if "loss" in record:
            last_train = record
        if any(key.startswith("eval_") for key in record):
            last_eval = record
    return last_train, last_eval


def read_run(folder: str | Path) -> RunInfo:
    folder = Path(folder)
    last_train, last_eval = _last_records(folder / METRICS_FILE)
    return RunInfo(folder=folder, config=_run_config(folder), last_train=last_train,
                   last_eval=last_eval, evaluation=_read_json(folder / EVALUATION_FILE),
                   summary=_read_json(folder / RUN_SUMMARY_FILE))


# What a run folder holds besides runs: never searched for runs.
_NOT_RUNS = {"checkpoints", "reference-cache", "tensorboard", "mlruns", "wandb", "pairs"}


def _is_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG_FILE).is_file() or (folder / METRICS_FILE).is_file()


def find_runs(folders: list[str | Path]) -> list[Path]:
    """Run folders among `folders` and below them (a sweep's root holds one run per subfolder, the
    demo's its runs and an online/ folder of rounds), in the order given, each level by name."""
    found: list[Path] = []

    def visit(folder: Path) -> None:
        folder = standing(folder)  # an --overwrite not committed yet: the run it replaces (folder_swap)
        if _is_run(folder) and folder not in found:
            found.append(folder)
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _NOT_RUNS
                            and not p.name.endswith((SWAP_SUFFIX, HALF_SUFFIX))):
            visit(child)

    for given in map(Path, folders):
        if standing(given).is_dir():
            visit(given)
    return found


def write_run_summary(folder: str | Path, *, wall_seconds: float, data: dict[str, Any]) -> Path:
    """Record what the run folder cannot tell otherwise: how long training took, and how many
    rows the data held, kept and skipped (by reason)."""
    path = Path(folder) / RUN_SUMMARY_FILE
    summary = {"wall_seconds": round(wall_seconds, 3) if math.isfinite(wall_seconds) else None, "data": data}
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path
