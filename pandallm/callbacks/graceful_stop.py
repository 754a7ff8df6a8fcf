"""Stopping on SIGTERM / SIGUSR1 with one complete checkpoint, at a batch boundary, on every rank at once."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

# 128 + SIGTERM, the status a process killed by SIGTERM reports: the run did not finish.
EXIT_CODE_STOPPED = 143


class StoppedBySignal(SystemExit):
    """Raised after the stop checkpoint is saved; exits with `EXIT_CODE_STOPPED`."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE_STOPPED)


class GracefulStop(L.Callback):
    """On a stop signal: finish the current optimizer step, save `last.ckpt` once, and exit.

    The handler only sets a flag. Saving inside a signal handler can deadlock (a collective or a lock taken by the
    interrupted code; Lightning #21406), so the save happens at the next optimizer-step boundary, where gradient
    accumulation is complete and the loop state is consistent. Ranks agree with one all-reduce per step, so a
    signal that reaches one rank stops all of them at the same step. Further signals while stopping do nothing.
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        """
        Args:
            signals: Signal names that stop the run; default SIGTERM and SIGUSR1 (SLURM's warning signal).
        """
        self.signals = [getattr(signal, name) for name in (signals or ["SIGTERM", "SIGUSR1"])]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._step = -1
        self._saved = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own handlers, which save nothing and broadcast inside the handler.
        self._previous = {signum: signal.signal(signum, self._handler) for signum in self.signals}
        self._step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._saved or trainer.global_step == self._step:  # mid gradient accumulation: not a place to stop
            return
        self._step = trainer.global_step
        requested = torch.tensor(float(self.received is not None), device=pl_module.device)
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce(requested, reduce_op="sum")
        if not requested.item():
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
            log.warning("pandallm: stopping on %s after step %d; saved %s", name, trainer.global_step, path)
        # The exit waits for the next hook: Lightning logs this step's metrics after `on_train_batch_end`.
        self._saved = True

    def _exit_if_saved(self) -> None:
        if self._saved:
            raise StoppedBySignal()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._exit_if_saved()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_saved()  # before epoch-end validation and checkpointing: the stop checkpoint is saved

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """`last.ckpt` where the checkpoint callback writes, so that `--ckpt_path last` resumes from it."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        name = getattr(callback, "CHECKPOINT_NAME_LAST", "last") + getattr(callback, "FILE_EXTENSION", ".ckpt")
        return Path(directory) / name
