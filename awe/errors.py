"""User-facing errors: one line naming what is wrong, where, and how to fix it.

The CLI turns an :class:`AweError` into that line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations


class AweError(Exception):
    """A problem with the user's input or options (not a bug in awe).

    ``field``: the option the message is about, by its name in the library (a config field,
    e.g. ``dim``), when it is one; the message then starts with that name. A front end maps the
    name to its own spelling (the CLI: ``--dim``).
    """

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


def invalid(field: str, problem: str) -> AweError:
    """The error of an option's value: ``"<field> <problem>"``, with :attr:`AweError.field`."""
    return AweError(f"{field} {problem}", field=field)


class DataError(AweError):
    """Bad input data. ``where`` names the file, row and column when they are known."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None, hint: str | None = None):
        parts = []
        if file is not None:
            parts.append(str(file))
        if row is not None:
            parts.append(f"row {row}")
        if column is not None:
            parts.append(f"column '{column}'")
        where = ", ".join(parts)
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)
        self.file, self.row, self.column = file, row, column


class TrainingDiverged(AweError):
    """A non-finite loss or weight appeared during training."""
