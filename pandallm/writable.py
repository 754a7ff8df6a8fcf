"""Where a run writes: every directory checked before the run starts, and a write that fails for lack of space
named with its file and the space it needed.

A checkpoint directory that could not be written used to be found out at the first save, after the training it was
to keep. A full disk said `[Errno 28] No space left on device` without naming a file, or, from the tokenized-data
cache, `DatasetGenerationError` with the cause sixty lines up.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L

from pandallm.errors import ConfigError, StorageError

FULL = (errno.ENOSPC, errno.EDQUOT)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: str | Path, option: str) -> None:
    """Create and delete a file where `directory` is, or, while it does not exist, in the nearest existing directory
    above it, where it would be created; `option` is the setting that chose it, for the message.

    A real write, not `os.access`: permission bits say nothing about a read-only file system, and nothing to root.
    Nothing is left behind, and no directory is created early (loggers number their run directories by what exists).
    """
    directory = Path(directory)
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise ConfigError(f"{option} '{directory}': cannot be created, '{existing}' is a file; give a directory")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".pandallm-write-check-", dir=existing)
    except OSError as e:
        where = "" if existing == directory else f" (it would be created in '{existing}')"
        raise ConfigError(
            f"{option} '{directory}': cannot be written{where}: {e.strerror}; give a writable directory"
        ) from e
    os.close(descriptor)
    os.unlink(probe)


def run_directories(trainer: L.Trainer, stage: str | None, cache_dir: str | None) -> dict[str, Path]:
    """The directories a `stage` run (None: `fit`) will write, keyed by the setting that chose each."""
    from pandallm.callbacks.export import HFExport
    from pandallm.callbacks.predictions import PredictionWriter

    found: dict[str, str | Path] = {}
    stage = stage or "fit"
    for logger in trainer.loggers:
        # The logger's own directory, not its numbered version directory (not decided yet on every rank).
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        if root:
            found[f"trainer.logger ({type(logger).__name__} save_dir/name)"] = root
    if not trainer.loggers:
        found["trainer.default_root_dir"] = trainer.default_root_dir
    for callback in trainer.callbacks:
        if stage == "fit" and callback in trainer.checkpoint_callbacks and getattr(callback, "dirpath", None):
            found[f"trainer.callbacks ({type(callback).__name__} dirpath)"] = callback.dirpath
        elif stage == "fit" and isinstance(callback, HFExport) and callback.enabled and callback.dirpath:
            found["export.dirpath"] = callback.dirpath
        elif stage == "predict" and isinstance(callback, PredictionWriter) and callback.path:
            found["predictions.path"] = Path(callback.path).parent
    if cache_dir and stage != "predict":
        found["data.cache_dir"] = cache_dir
    return {option: Path(path) for option, path in found.items() if "://" not in str(path)}  # not object stores


def check_run_directories(trainer: L.Trainer, stage: str | None, cache_dir: str | None) -> None:
    for option, directory in run_directories(trainer, stage, cache_dir).items():
        check_writable(directory, option)


def full_disk(error: BaseException) -> OSError | None:
    """The out-of-space `OSError` that caused `error`, if one did (libraries wrap it in their own errors)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def size(num_bytes: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while num_bytes >= 1024 and index < len(units) - 1:
        num_bytes, index = num_bytes / 1024, index + 1
    return f"{int(num_bytes)} bytes" if index == 0 else f"{num_bytes:.1f} {units[index]}"


def free_space(path: str | Path) -> str:
    try:
        return f"{size(shutil.disk_usage(_nearest_existing(Path(path))).free)} free there"
    except OSError:
        return "free space unknown"


def write_error(what: str, path: str | Path, error: OSError, needed: str | None = None) -> StorageError:
    """A `StorageError` naming the file or directory that could not be written; with a full disk, the space: what
    the write `needed` (as far as it is known) and what is free."""
    if error.errno in FULL:
        space = f"{needed}, {free_space(path)}" if needed else free_space(path)
        return StorageError(f"{what} '{path}': no space left on the device ({space})")
    return StorageError(f"{what} '{path}': cannot be written: {error.strerror or error}")
