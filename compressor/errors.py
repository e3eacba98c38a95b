"""User-facing errors: each carries one line that says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["DlncError"]


class DlncError(ValueError):
    """A problem with the user's input (a path, a file, an option), not a bug in dlnc."""
