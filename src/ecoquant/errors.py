"""User-facing errors.

Anything a user can cause (a wrong path, a bad option, a model with no matching
modules) is raised as :class:`EcoquantError` with a one-line message that says
what is wrong and how to fix it. The CLI prints that line and exits non-zero;
it never shows a traceback for these.
"""


class EcoquantError(Exception):
    """A problem with the user's input, reported as one line (what, and how to fix it)."""
