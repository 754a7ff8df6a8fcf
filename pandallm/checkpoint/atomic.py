"""Checkpoint files that are either complete or absent, and that are pandallm's when loaded.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the system
temp directory; when that is another filesystem than the checkpoints (local /tmp, checkpoints on NFS or Lustre,
the usual cluster layout) the final move is a copy, and a kill during it leaves a truncated file under the real
name. Here the temporary file sits beside the target, is fsynced, and `os.replace` makes it visible in one step.

Sharded strategies (FSDP2 through `ModelParallelStrategy`, Lightning's FSDP with sharded state dicts) write each
checkpoint as a directory, every rank its own shard, and would rewrite `last.ckpt/` in place: a kill in the middle
leaves new shards beside old metadata. Here they write into a new sibling directory, and global rank 0 swaps it
in once every shard and the metadata are complete; the previous checkpoint is removed only after that.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from pandallm.checkpoint.load import LOAD_ERRORS, WeightsOnlyLoad, load_error
from pandallm.errors import ModelError
from pandallm.writable import full_disk, size, write_error

log = logging.getLogger(__name__)


def _write_bytes(file, data: bytes) -> None:
    file.write(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" not in str(path) and Path(path).is_dir():
            raise ModelError(
                f"{path}: a directory, not a checkpoint file (a sharded or DeepSpeed checkpoint directory loads "
                "under the strategy that wrote it)"
            )
        try:
            # Always weights-only: Lightning's default for an http(s) URL is `weights_only=False`.
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except LOAD_ERRORS as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise load_error(path, e) from e
        # Checked before Lightning reads anything, so a file from elsewhere gets this message, not a KeyError.
        if not isinstance(checkpoint, dict) or "pandallm" not in checkpoint or "state_dict" not in checkpoint:
            raise ModelError(
                f"{path} is not a pandallm checkpoint (it has no 'pandallm' record); to start from a Hugging Face "
                "model, set model.model_name_or_path instead of --ckpt_path"
            )
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores: their uploads are atomic already
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                _write_bytes(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # a full disk can show here, not before
            os.replace(tmp, path)
            _fsync_directory(path.parent)
        except OSError as e:
            # The OSError names no file (a write) or the temporary one; the previous checkpoint at `path` is untouched.
            raise write_error("checkpoint", path, e, f"{size(buffer.getbuffer().nbytes)} to write") from e
        finally:
            tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a crash
    finally:
        os.close(descriptor)


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def swap_in(complete: Path, path: Path) -> None:
    """Make the complete checkpoint `complete` (a file or a directory) the one at `path`."""
    if path.is_dir() and not path.is_symlink():
        # A directory cannot be renamed over a non-empty one. Between these two renames `path` is missing;
        # `recover_swaps` puts the previous checkpoint back if a kill lands there.
        old = _old_name(path)
        os.rename(path, old)
        os.rename(complete, path)
        _fsync_directory(path.parent)
        shutil.rmtree(old)
    else:
        os.replace(complete, path)
        _fsync_directory(path.parent)


def recover_swaps(directory: str | Path) -> None:
    """Clean up after saves a kill interrupted, before a run looks for its checkpoint in `directory`.

    A previous checkpoint left under `.NAME.old-PID` by `swap_in` goes back to NAME if nothing is there (and is
    removed if the new one is); half-written `.NAME.tmp-PID` files and directories are removed. Called when no
    save can be running: before training starts.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for old in sorted(directory.glob(".*.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        path = directory / old.name[1:].rsplit(".old-", 1)[0]
        try:
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, path)
                log.warning("pandallm: restored %s, whose replacement was interrupted", path)
        except OSError:  # another rank got there first
            pass
    for tmp in directory.glob(".*.tmp-*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


class AtomicDirectorySave:
    """Wraps a sharded strategy's `save_checkpoint`: write into `.NAME.tmp-PID`, then swap it in as NAME."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.save = strategy.save_checkpoint

    def __call__(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if "://" in str(filepath):
            return self.save(checkpoint, filepath, storage_options)
        path = Path(filepath)
        # Each rank names its own; the strategy broadcasts rank 0's path before writing, so all shards land there.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if self.strategy.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.save(checkpoint, tmp, storage_options)
        except Exception as e:  # torch.distributed.checkpoint wraps the OSError of the rank whose write failed
            full = full_disk(e)
            if full is None:
                raise
            # The half-written directory is removed by `recover_swaps` when the run starts again; the previous
            # checkpoint at `path` is untouched.
            raise write_error("sharded checkpoint", path, full) from e
        # The strategy's save returns on rank 0 after its collective write finished on every rank and rank 0 wrote
        # the metadata: the directory is complete.
        if self.strategy.global_rank == 0:
            swap_in(tmp, path)


class AtomicCheckpoints(L.Callback):
    """Swaps the strategy's plain `TorchCheckpointIO` for `AtomicCheckpointIO`, makes the sharded strategies'
    directory checkpoints atomic with `AtomicDirectorySave`, and makes every strategy load weights-only
    (`WeightsOnlyLoad`).

    DeepSpeed, which writes its own directory layout, is left as it is.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        sharded = isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))
        if sharded and not isinstance(strategy.save_checkpoint, AtomicDirectorySave):
            strategy.save_checkpoint = AtomicDirectorySave(strategy)
        if not isinstance(strategy.load_checkpoint, WeightsOnlyLoad):
            strategy.load_checkpoint = WeightsOnlyLoad(strategy)
