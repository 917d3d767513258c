"""A training run's log: each line goes to the console and to `train.log` in the run folder.

Lines logged before the folder is claimed (the tokenizer, the data summary) are held and written
first, so the file reads as the whole run; a new run starts the file afresh, a resumed one adds to
it. A console whose reader went away (`dpokit train ... | head -2`) ends nothing: the run keeps
training and the file alone gets the rest."""

from __future__ import annotations

from pathlib import Path

from dpokit.io import Log, silence_stdout


class RunLog:
    """A `Log` that tees into the run folder's log file once `attach`ed."""

    def __init__(self, console: Log):
        self.console: Log | None = console
        self.path: Path | None = None
        self.held: list[str] = []  # lines logged before the run folder was ready

    def __call__(self, line: str) -> None:
        if not self._shown(line):
            self._write("dpokit: stdout was closed; training goes on, logging to this file only")
        self._write(line)

    def attach(self, path: Path, resumed: bool) -> None:
        """Write the held lines to `path` (after what a resumed run logged before) and tee from now on."""
        with path.open("a" if resumed else "w", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in self.held)
        self.path, self.held = path, []

    def _shown(self, line: str) -> bool:
        """Show the line on the console; False the first time the console turns out closed."""
        if self.console is None:
            return True
        try:
            self.console(line)
        except BrokenPipeError:
            silence_stdout()
            self.console = None
            return False
        return True

    def _write(self, line: str) -> None:
        if self.path is None:
            self.held.append(line)
            return
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
