"""`dpokit runs [FOLDER ...]`: the runs in some folders, one line each, in the terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dpokit.cli.common import add_debug_flag
from dpokit.errors import DpokitError
from dpokit.folder_swap import standing
from dpokit.runinfo import find_runs, read_run

# Column -> (header, format). Rows sort by any column; a run without the figure sorts last.
COLUMNS: dict[str, tuple[str, str]] = {
    "run": ("run", "{}"),
    "model": ("model", "{}"),
    "loss": ("loss", "{}"),
    "beta": ("β", "{:g}"),
    "lora": ("LoRA r", "{:d}"),
    "steps": ("steps", "{:d}"),
    "loss_final": ("final loss", "{:.4f}"),
    "reward_accuracy": ("reward acc", "{:.3f}"),
    "eval_loss": ("eval loss", "{:.4f}"),
    "eval_reward_accuracy": ("eval acc", "{:.3f}"),
    "judged_reward": ("judged reward", "{:.3f}"),
    "win_rate": ("win rate", "{:.3f}"),
    "kl": ("KL", "{:.3f}"),
    "wall_s": ("wall s", "{:.0f}"),
}


def add_runs_command(sub) -> None:
    runs = sub.add_parser(
        "runs", help="list runs: model, loss, β, LoRA rank, steps, final figures, evaluation, wall time",
        description="A table of the dpokit runs in each FOLDER and in its subfolders (a sweep's or the "
        "demo's root lists all of its runs). Figures a run does not have show as '-'.")
    runs.add_argument("folders", nargs="*", default=["."], metavar="FOLDER", help="run folders (default: .)")
    runs.add_argument("--sort", choices=sorted(COLUMNS), default="run", help="column to sort by (default: run)")
    runs.add_argument("--reverse", action="store_true", help="sort in descending order")
    runs.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    add_debug_flag(runs)
    runs.set_defaults(func=_cmd_runs)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def sorted_rows(rows: list[dict[str, Any]], column: str, reverse: bool = False) -> list[dict[str, Any]]:
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    try:
        present.sort(key=lambda r: r[column], reverse=reverse)
    except TypeError:  # mixed kinds in one column (a hand-edited config): compare as text
        present.sort(key=lambda r: str(r[column]), reverse=reverse)
    return present + missing


def format_table(rows: list[dict[str, Any]]) -> str:
    shown = [c for c in COLUMNS if c == "run" or any(r.get(c) is not None for r in rows)]
    cells = [[COLUMNS[c][0] for c in shown]]
    cells += [[_cell(r.get(c), COLUMNS[c][1]) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _cmd_runs(args: argparse.Namespace) -> int:
    for folder in args.folders:
        if not standing(Path(folder)).is_dir():
            raise DpokitError(f"FOLDER {folder}: not a folder")
    rows = [read_run(path).row() for path in find_runs(args.folders)]
    if not rows:
        raise DpokitError(f"no dpokit runs in {', '.join(args.folders)} (a run folder holds dpokit_config.yaml "
                          "or metrics.jsonl)")
    rows = sorted_rows(rows, args.sort, args.reverse)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
