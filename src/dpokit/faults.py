"""Failures on purpose, for the tests that prove a crash loses nothing the user has.

`DPOKIT_FAULT="POINT=ACTION[,POINT=ACTION...]"` makes `inject(POINT)` raise MemoryError (ACTION
`raise`: an out-of-memory where the code allocates) or kill the process with SIGKILL (ACTION `kill`:
the kernel's OOM killer, a power cut), and `active(POINT)` true (ACTION `on`: a switch). Unset -
always, outside tests - every call does nothing. The points are named where they are injected:
`reference-pass` (model/reference.py), and the steps of a folder replacement (folder_swap.py).
"""

from __future__ import annotations

import os
import signal

ENV = "DPOKIT_FAULT"


def _actions() -> dict[str, str]:
    setting = os.environ.get(ENV, "")
    return dict(item.split("=", 1) for item in setting.split(",") if "=" in item)


def inject(point: str) -> None:
    action = _actions().get(point)
    if action == "raise":
        raise MemoryError(f"{point}: out of memory (injected by {ENV})")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def active(point: str) -> bool:
    return _actions().get(point) == "on"
