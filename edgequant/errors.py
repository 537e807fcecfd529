"""The one exception type users see: a one-line, actionable message."""


class EdgequantError(Exception):
    """Bad input or an unrecoverable condition, reported as one line by the CLI."""
