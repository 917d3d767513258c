"""Reading a folder back whole: its files' bytes, and what a replacement left beside it."""

from __future__ import annotations

from pathlib import Path

from dpokit.io import LOCK_FILE


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path, with its bytes (the lock file aside: each process
    that locks the folder writes its pid there)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def leftovers(run: Path) -> list[str]:
    """What a replacement may leave beside the folder (`.NAME.dpokit-*`): nothing, once settled."""
    return sorted(p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}."))
