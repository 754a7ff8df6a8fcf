"""Logging training throughput in tokens per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from pandallm.log_steps import logs_this_step


class TokensPerSecond(L.Callback):
    """Logs `train/tokens_per_sec`: non-padding tokens of all ranks per second of wall time, averaged over the
    steps since the last time the loggers wrote.

    Lightning's `ThroughputMonitor` counts rank 0's items times the world size and names them "items"; here the
    tokens of every rank are summed, padding excluded. The count stays a tensor between writes (no device sync per
    batch), and the ranks' counts are summed only when the loggers write (one small all-reduce then).
    """

    def __init__(self) -> None:
        self._tokens: torch.Tensor | int = 0
        self._start: float | None = None
        self._step = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Started here rather than at epoch start: a run resumed mid-epoch does not start an epoch.
        if self._start is None:
            self._tokens, self._start, self._step = 0, time.perf_counter(), trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None  # validation time is not training time

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens = self._tokens + batch["attention_mask"].sum()
        stepped = trainer.global_step != self._step  # the optimizer stepped: the accumulation window is complete
        self._step = trainer.global_step
        if not (stepped and logs_this_step(trainer)):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        tokens = torch.as_tensor(self._tokens, dtype=torch.float32, device=pl_module.device)
        tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        # On the progress bar too (as `train/tokens_per_sec`), next to the loss, the learning rate and the ETA.
        pl_module.log("train/tokens_per_sec", float(tokens) / max(now - self._start, 1e-9), on_step=True, prog_bar=True)
        self._tokens, self._start = 0, now
