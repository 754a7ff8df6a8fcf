"""Reading a checkpoint file without running code from it, and saying clearly when a file is not one."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pandallm.errors import ModelError

# What `torch.load` raises on a file that is not a checkpoint it can read: objects refused by `weights_only`
# (UnpicklingError), random bytes or a truncated file (RuntimeError, EOFError, ValueError).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)


def load_error(path: str | Path, error: Exception) -> ModelError:
    """The error to raise for `path`, which `torch.load` refused with `error`."""
    # torch's weights-only message is a paragraph of advice; one of its lines names what was refused.
    lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    reason = (named or [line for line in lines if line] or [type(error).__name__])[0]
    if isinstance(error, pickle.UnpicklingError) and "global" in reason.lower():
        return ModelError(
            f"{path}: not loadable as weights only: it holds objects, which pandallm does not unpickle, since "
            f"unpickling can run any code ({reason})"
        )
    return ModelError(f"{path}: not a torch checkpoint file ({reason})")


def safe_load(path: str | Path) -> Any:
    """`torch.load` with `weights_only`: tensors and plain containers, never pickled code (a checkpoint from
    elsewhere cannot run anything here). Memory-mapped where the file is in `torch.save`'s zip format: tensors are
    paged in as they are read, not loaded whole first (reading a 65B checkpoint's settings costs next to nothing)."""
    if Path(path).is_dir():
        raise ModelError(f"{path}: a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except LOAD_ERRORS as e:
        raise load_error(path, e) from e
