"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DpokitError(Exception):
    """A user-facing error: the message names the file, row, field or option and what to do."""
