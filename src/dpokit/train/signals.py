"""SIGINT/SIGTERM during training: finish the current step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from dpokit.errors import TrainingInterrupted


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into a flag the loop checks after each
    step; a second signal stops at once (the last good checkpoint is untouched)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def interrupted(self, step: int, checkpoint: Path) -> TrainingInterrupted:
        name = signal.Signals(self.requested).name
        return TrainingInterrupted(
            f"{name} received: stopped after step {step} and saved {checkpoint}; "
            "run the same command with --resume auto to continue",
            exit_code=128 + int(self.requested),
        )
