"""Where training is in its data, as checkpoints keep it, and the loaders that resume from it.

The position is counted from the trainer's progress (the batches the training loop has finished), never from a
loader, whose workers fetch batches ahead of training. Indexed data (the Arrow cache) keeps `(epoch, rows of its
order read by all ranks)` and rebuilds the order (pandallm.data.sampling); a stream keeps where each of its workers
is (pandallm.data.streaming).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from pandallm.data.streaming import DocumentStream, StreamLayout


def trained_position(trainer: L.Trainer) -> tuple[int, int]:
    """`(epoch, batches of it trained on each rank)` of a fitting trainer, at a checkpoint.

    An epoch is under way while the loop's processed epochs trail its started ones: then the batches count, and a
    save at its last batch (or at the validation after it) points at the next epoch's start. Otherwise (before the
    first epoch, or after `fit` ended) the position is the start of epoch `processed`.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.processed >= epochs.started:
        return epochs.processed, 0
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        return epochs.processed + 1, 0
    return epochs.processed, batches


def epoch_cut_short(checkpoint: dict[str, Any]) -> tuple[int, int, int] | None:
    """`(epoch, batches trained, batches in it)` when `checkpoint` was saved by a `fit` that stopped inside an epoch
    (`trainer.max_steps` reached): Lightning counts that epoch as done, so a resumed run starts the next one. None
    for any other checkpoint, and for a stream (its epochs have no end)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = loop.get("epoch_progress", {}).get("current", {})
    batches = loop.get("epoch_loop.batch_progress", {}).get("current", {}).get("processed")
    data = checkpoint.get("PandaDataModule", {})
    if not epochs or not batches or "rows_per_epoch" not in data or epochs.get("processed") != epochs.get("started"):
        return None
    per_epoch = -(-data["rows_per_epoch"] // data["batch_rows"])
    return (epochs["processed"] - 1, batches, per_epoch) if batches < per_epoch else None


class ResumableDataLoader(DataLoader):
    """The training loader of indexed data. Its position is not its own state: the data module saves it and the
    `EpochSampler` rebuilds the order from it. The empty `state_dict` tells Lightning that the loader resumes
    mid-epoch, which it does."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class StreamLoader(DataLoader):
    """The loader of a `DocumentStream`. Each `iter()` starts the workers again (not persistent) from the positions
    of the batches trained so far, so the batches that the previous iterator's workers fetched ahead, untrained, are
    produced again, not skipped (a new Lightning epoch with `limit_train_batches`, or a reload)."""

    def __init__(self, stream: DocumentStream, current_layout: Callable[[], StreamLayout], **workers: Any) -> None:
        super().__init__(stream, batch_size=None, **{**workers, "persistent_workers": False})  # batched in workers
        self._current_layout = current_layout

    def __iter__(self):
        self.dataset.layout = self._current_layout()
        return super().__iter__()
