"""Errors the runtime raises about the user's input (data, checkpoints, state files, settings).

The command line turns a `RuntimeInputError` into a one-line diagnostic and exit code 1; anything else
that escapes is a bug (exit 70). The runtime never imports the compiler, so it has its own small type.
"""

from __future__ import annotations


class RuntimeInputError(Exception):
    """A problem with something the user gave us, with the file it concerns and a hint to fix it."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}"
