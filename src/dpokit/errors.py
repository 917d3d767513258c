"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DpokitError(Exception):
    """A user-facing error: the message names the file, row, field or option and what to do."""


class TrainingInterrupted(DpokitError):
    """A signal stopped training after a checkpoint was saved; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (the class name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
