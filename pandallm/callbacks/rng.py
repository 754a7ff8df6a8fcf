"""Random-number-generator state in checkpoints, so that a resumed run draws the same dropout masks."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from pandallm.distributed import gather_from_ranks


def capture() -> dict[str, Any]:
    """The RNG states as plain Python lists and ints: they gather across ranks with `all_gather_object` and
    load back with `torch.load(weights_only=True)`."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class RNGState(L.Callback):
    """Saves each rank's RNG states with the checkpoint and puts them back right before the first resumed batch.

    Restoring at `load_state_dict` time would be too early: creating the data-loader iterator and running the
    sanity check draw from the global generator after the restore, which the uninterrupted run did at other
    points. Restoring at the first `on_train_batch_start` lines the resumed run up with the uninterrupted one,
    whose state at that point was the saved state (the save happens after the step, at the batch boundary).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank

    def state_dict(self) -> dict[str, Any]:
        # Every rank draws its own dropout masks; only rank 0 writes the checkpoint, so it gathers them all.
        return {"ranks": gather_from_ranks(capture())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        self._pending = ranks[self._rank] if self._rank < len(ranks) else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
