"""The one exception type for user mistakes: the CLIs print its message (no traceback) and exit 2."""


class UserError(ValueError):
    """A problem with the user's input (a path, a flag, a label, a scale) and how to fix it."""
