"""Checkpoint files that are either complete or absent, and that are pandallm's when loaded.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the system
temp directory; when that is another filesystem than the checkpoints (local /tmp, checkpoints on NFS or Lustre,
the usual cluster layout) the final move is a copy, and a kill during it leaves a truncated file under the real
name. Here the temporary file sits beside the target, is fsynced, and `os.replace` makes it visible in one step.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pandallm.errors import ModelError


def _write_bytes(file, data: bytes) -> None:
    file.write(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                _write_bytes(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        finally:
            tmp.unlink(missing_ok=True)


class AtomicCheckpoints(L.Callback):
    """Swaps the strategy's plain `TorchCheckpointIO` for `AtomicCheckpointIO`.

    Strategies with their own checkpoint writers (DeepSpeed, sharded FSDP) are left as they are.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
