"""Sources -> rows: read preference pairs from a JSON Lines file with errors that name the row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import DpokitError

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One canonical pair of plain strings; `index` is the 1-based line it came from."""

    prompt: str
    chosen: str
    rejected: str
    index: int


def read_jsonl_pairs(path: str | Path) -> list[PreferencePair]:
    """Read `{"prompt", "chosen", "rejected"}` rows; a bad line fails naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise DpokitError(f"data file {path} does not exist")
    if not path.is_file():
        raise DpokitError(f"data path {path} is not a file")
    pairs = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DpokitError(f"cannot read data file {path}: {exc.strerror}") from None
    line_no = 0
    with handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                pairs.append(_parse_row(line, path, line_no))
        except UnicodeDecodeError:
            raise DpokitError(f"{path}: not UTF-8 text (line {line_no + 1})") from None
    if not pairs:
        raise DpokitError(f"data file {path} holds no rows")
    return pairs


def _parse_row(line: str, path: Path, line_no: int) -> PreferencePair:
    where = f"{path}, line {line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DpokitError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DpokitError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise DpokitError(f"{where}: missing field '{name}'")
        if not isinstance(row[name], str):
            raise DpokitError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            raise DpokitError(f"{where}: field '{name}' is empty")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"], line_no)
