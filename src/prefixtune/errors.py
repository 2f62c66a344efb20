"""The errors a user can cause and fix; the CLI prints them as one line instead of a stack trace.

A leaf module: it imports nothing of prefixtune, so every layer (data, models, prefix, store, train, eval)
can subclass `UserError` without the server or the CLI depending on the training code.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user caused and can fix (a bad flag, file, name or model); the message says how."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types to report as one line (kept as a tuple so callers can extend it)."""
    return (UserError,)
