"""Errors a user can act on: each says what is wrong, where, and what to do."""

from __future__ import annotations


class VinakitError(Exception):
    """Base class of every error vinakit raises on purpose."""


class ParamsError(VinakitError, ValueError):
    """A notebook parameter is unknown, of the wrong type or out of range."""


class DataError(VinakitError, ValueError):
    """Bad input data, located by file, 1-based line/row and field.

    Args:
        message: what is wrong and what to do about it.
        path: the file (or dataset id) the bad row came from.
        line: the 1-based line (jsonl/txt) or row (csv/parquet/json list) number.
        field: the field that is wrong, when one is.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.reason = message
        self.path = path
        self.line = line
        self.field = field
        where = ", ".join(part for part in (
            f"file {path}" if path else "",
            f"line {line}" if line is not None else "",
            f"field '{field}'" if field else "",
        ) if part)
        super().__init__(f"{where}: {message}" if where else message)


class RunFolderExistsError(VinakitError, FileExistsError):
    """A run folder already exists; runs are never overwritten."""


class TrainingDivergedError(VinakitError):
    """Training stopped at a NaN/inf loss or gradient norm; nothing was saved as the run's result.

    Args:
        message: what happened, the last good checkpoint and what to do.
        step: the optimizer step (1-based) whose loss or gradients were not finite.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
