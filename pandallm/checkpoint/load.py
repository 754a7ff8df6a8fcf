"""Reading checkpoints without running code from them, and saying clearly when a file is not one.

A pickle can call any function while it is read. Every checkpoint pandallm reads goes through one of these:
`safe_load` for `torch.save` files (`torch.load` with `weights_only`); `WeightsOnlyReader` and `WeightsOnlyPlanner`
for torch.distributed.checkpoint (DCP) directories, whose `.metadata` torch unpickles without restriction and
whose non-tensor items it loads with `weights_only=False`; and `WeightsOnlyLoad`, around a Lightning strategy's
`load_checkpoint`, for what Lightning reads itself (`fit`, `validate`, `test`, `predict` with `--ckpt_path`).
"""

from __future__ import annotations

import io
import pickle
import sys
import warnings
import zipfile
from pathlib import Path, PosixPath, PurePosixPath
from typing import IO, Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import ReadItem

from pandallm.errors import ConfigError, ModelError, PandaError

# What `torch.load` raises on a file that is not a checkpoint it can read: objects refused by `weights_only`
# (UnpicklingError), random bytes or a truncated file (RuntimeError, EOFError, ValueError).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)
# Lightning's file of everything in a sharded checkpoint that is not a tensor shard (loops, hyper-parameters).
METADATA_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"


def load_error(path: str | Path, error: Exception) -> ModelError:
    """The error to raise for `path`, which `torch.load` refused with `error`."""
    # torch's weights-only message is a paragraph of advice; one of its lines names what was refused.
    lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    reason = (named or [line for line in lines if line] or [type(error).__name__])[0]
    if isinstance(error, pickle.UnpicklingError) and any(op in reason.lower() for op in ("global", "build")):
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


# Everything torch's DCP writes into `.metadata` (torch 2.13: `Metadata` and the dataclasses it holds, a
# `pathlib` checkpoint id, tensor sizes, dtypes, layouts through `torch.serialization._get_layout` and memory
# formats through `_MEM_FORMAT_ENCODING`), and nothing that can do anything else when called.
_METADATA_RECORDS = frozenset(
    {
        dcp_metadata.Metadata,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_filesystem._StorageInfo,
    }
)
_METADATA_GLOBALS = _METADATA_RECORDS | {
    dcp_metadata._MEM_FORMAT_ENCODING,
    torch.Size,
    torch.serialization._get_layout,
    PosixPath,
    PurePosixPath,
}
# "pathlib": where Python 3.11 writes `PosixPath` from, which later Pythons define in `pathlib._local`.
_METADATA_MODULES = frozenset(c.__module__ for c in _METADATA_GLOBALS) | {"torch", "pathlib"}
# What Python's unpickler raises on damaged or foreign bytes (KeyError: an unknown opcode).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError)


class _Refused(pickle.UnpicklingError):
    """An object that `.metadata` may not hold."""


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler (the C one cannot be told what BUILD may change), refusing every global but
    `_METADATA_GLOBALS` and dtypes, layouts and memory formats, and BUILD but on a new metadata record: BUILD on a
    class, a function or an enum member would set attributes of objects that the whole process shares."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Looked up among modules already imported, never imported: importing a module can run code too.
        found = getattr(sys.modules.get(module), name, None) if module in _METADATA_MODULES else None
        harmless = isinstance(found, (torch.dtype, torch.layout, torch.memory_format))
        if found is None or not (harmless or any(found is allowed for allowed in _METADATA_GLOBALS)):
            raise _Refused(f"Unsupported global: GLOBAL {module}.{name}")
        return found

    def load_build(self) -> None:
        if type(self.stack[-2]) not in _METADATA_RECORDS:
            raise _Refused(f"Unsupported: BUILD of {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_dcp_metadata(file: IO[bytes], path: str | Path) -> dcp_metadata.Metadata:
    """A DCP `.metadata` file, unpickled with only the classes of a checkpoint's metadata allowed."""
    try:
        metadata = _MetadataUnpickler(file).load()
    except _Refused as e:
        raise load_error(path, e) from e
    except _UNPICKLE_ERRORS as e:
        raise ModelError(f"{path}: not the metadata of a torch.distributed.checkpoint directory ({e!r})") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ModelError(f"{path}: not the metadata of a torch.distributed.checkpoint directory")
    return metadata


class WeightsOnlyReader(FileSystemReader):
    """torch's `FileSystemReader`, reading `.metadata` with `read_dcp_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # torch's names: `.metadata`, or `__RANK.metadata` where each rank wrote its own.
        rank = kwargs.get("rank")
        path = self.fs.concat_path(self.path, DCP_METADATA_FILE if rank is None else f"__{rank}{DCP_METADATA_FILE}")
        with self.fs.create_stream(path, "rb") as file:
            metadata = read_dcp_metadata(file, path)
        # As torch's own reader does: a load id per load, for planners and logs.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """torch's `DefaultLoadPlanner` for a flat state dict (keys are the checkpoint's own, e.g. `state_dict.x.w`),
    loading non-tensor items with `weights_only=True`; torch's planner loads them with `weights_only=False`.
    The loaded non-tensor items are in `planner.state_dict` afterwards."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(flatten_state_dict=False)
        self.path = path

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.state_dict[fqn] = torch.load(value, map_location="cpu", weights_only=True)
        except LOAD_ERRORS as e:
            raise load_error(f"{self.path} (item '{fqn}')", e) from e


def load_weights_only(path: str | Path, state_dict: dict[str, Any]) -> dict[str, Any]:
    """DCP's `load` of the flat `state_dict` from the directory `path` in this process alone (no process group),
    with `WeightsOnlyReader` and `WeightsOnlyPlanner`: tensors are filled in place; the state dict is returned
    with the non-tensor items loaded."""
    planner = WeightsOnlyPlanner(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # that is the intent
            dcp_load(state_dict, storage_reader=WeightsOnlyReader(path), planner=planner, no_dist=True)
    except CheckpointException as e:  # DCP wraps every error of every step; ours says what is wrong
        ours = [error for error, _ in e.failures.values() if isinstance(error, PandaError)]
        if ours:
            raise ours[0] from e
        raise
    return planner.state_dict


def is_dcp_directory(path: str | Path) -> bool:
    """Whether `path` is, or claims to be, a sharded checkpoint directory (Lightning goes by `meta.pt` alone)."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_METADATA_FILE).exists() or (path / METADATA_FILE).exists())


def check_dcp_directory(path: str | Path) -> None:
    """Raise `ModelError` unless everything Lightning and torch unpickle from the sharded checkpoint directory
    `path` loads without running code: `.metadata`, every non-tensor item in the shards, and `meta.pt`."""
    path = Path(path)
    for name in (DCP_METADATA_FILE, METADATA_FILE):
        if not (path / name).is_file():
            raise ModelError(f"{path}: not a sharded checkpoint directory (it has no {name})")
    # torch reads a rank's own `__RANK.metadata` where reading `.metadata` fails for any reason.
    for own in sorted(path.glob(f"__*{DCP_METADATA_FILE}")):
        with open(own, "rb") as file:
            read_dcp_metadata(file, own)
    stored = WeightsOnlyReader(path).read_metadata().state_dict_metadata
    items = {fqn: None for fqn, meta in stored.items() if isinstance(meta, dcp_metadata.BytesStorageMetadata)}
    if items:
        load_weights_only(path, items)
    safe_load(path / METADATA_FILE)


class WeightsOnlyLoad:
    """Wraps a strategy's `load_checkpoint`: it always loads with `weights_only=True` (Lightning's default is
    `False` for an http(s) URL), and what the strategy would unpickle without restriction is checked first.

    Under `ModelParallelStrategy` (FSDP2) and `FSDPStrategy` a sharded directory is read by torch's DCP, which
    unpickles `.metadata` and each non-tensor item freely: `check_dcp_directory` reads them the safe way before.
    `FSDPStrategy` reads a checkpoint file with Lightning's `_lazy_load`, an unrestricted unpickler: the file is
    read with `safe_load` before. A DeepSpeed checkpoint directory is left to DeepSpeed, which unpickles it (the
    documented exception).
    """

    def __init__(self, strategy: Strategy) -> None:
        self.sharded = isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))
        self.load = strategy.load_checkpoint

    def __call__(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ConfigError(
                "weights_only: false: pandallm loads checkpoints weights-only, since unpickling can run any code "
                "(its own checkpoints hold nothing else); leave weights_only unset or true"
            )
        local = "://" not in str(checkpoint_path)
        if local and is_dcp_directory(checkpoint_path):
            check_dcp_directory(checkpoint_path)
        elif local and self.sharded and Path(checkpoint_path).is_file():
            safe_load(checkpoint_path)
        return self.load(checkpoint_path, weights_only=True)
