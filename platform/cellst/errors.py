"""Exceptions as the one line a user sees (the project's rule: errors in one line)."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type when the message is empty, else the first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
