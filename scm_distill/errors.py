"""The exceptions that are the user's to fix: each carries one sentence naming the problem and what to do.

`scm-distill` prints such an error as one line and exits 1; any other exception is a bug in the toolkit and
shows its traceback (exit 2). UserError subclasses ValueError, so code that catches ValueError keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input, setting or file: one sentence, nothing half-written."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NonFiniteError(UserError):
    """Training produced non-finite values (loss, gradient, parameters or EMA); nothing non-finite is exported."""


class Interrupted(UserError):
    """Ctrl-C during a run, with a sentence saying how to continue it."""
