"""User mistakes: one exception type, and the one line a CLI prints for it (no traceback, exit code 2)."""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem with the user's input (a path, a flag, a label, a scale) and how to fix it."""


def user_message(err: BaseException) -> str | None:
    """The line a CLI prints for an error its user can fix: a UserError, a file that cannot be read or
    written, running out of memory with a batch too large. None for anything else: a bug."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return (
            f"could not read or write {err.filename or 'a file'} ({err.strerror or err}); check the path and the space"
        )
    text = str(err).lower()
    if isinstance(err, (MemoryError, RuntimeError)) and ("out of memory" in text or "can't allocate memory" in text):
        return (
            "ran out of memory: a batch that large does not fit this machine; lower the batch size "
            "(--teacher-batch-size, --distill-batch-size, --round-batch-size) or the number of samples"
        )
    return None


def report(err: Exception) -> int:
    """Print a user's mistake as one line and return the exit code 2; re-raise anything else, so a bug
    keeps its traceback."""
    message = user_message(err)
    if message is None:
        raise err
    print(f"error: {message}", file=sys.stderr)
    return 2
