"""Typed user errors.

Everything a user can get wrong (a malformed record, a missing file, a checkpoint from elsewhere) raises one of
these, with a message that names the file, line and field (or the config key) and says what would be valid.
`assert` is kept for internal invariants.
"""

from __future__ import annotations

from pathlib import Path


class PandaError(ValueError):
    """Base class of pandallm's user-facing errors."""


class DataFormatError(PandaError):
    """A record in a data file is malformed: broken JSON, a missing field, or a field of the wrong type."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")


class DatasetError(PandaError):
    """The data as a whole cannot be used: a missing directory, no files, or too little data."""


class ModelError(PandaError):
    """A model or checkpoint cannot be used: unknown preset, not a LLaMA architecture, mismatched shapes."""


class ConfigError(PandaError):
    """A configuration file or option cannot be used: a malformed sweep file, an index out of range."""


class StorageError(PandaError):
    """A file or directory cannot be written: no space left, a read-only file system. The message names it."""


class RewardError(PandaError):
    """A reward function or reward model gave what a reward cannot be: the wrong number of values, a value that is not
    a finite number. The message names the function and the record."""
