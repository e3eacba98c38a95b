"""User-facing errors: each carries one line that says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["DlncError", "Interrupted", "first_line"]


class DlncError(ValueError):
    """A problem with the user's input (a path, a file, an option), not a bug in dlnc.

    Its message is one line: line breaks that come in with the user's data (a field name,
    a file's text quoted in the message) are shown escaped, as `\\n`."""

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str):
            message = message.strip().replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message, *args)


class Interrupted(DlncError):
    """The user stopped the run (Ctrl-C, SIGTERM); the message says what was kept. The CLI
    exits 130, as for any Ctrl-C."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
