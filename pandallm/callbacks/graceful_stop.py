"""Stopping on SIGTERM / SIGUSR1 with one complete checkpoint, at a batch boundary, on every rank at once; under
SLURM, requeueing the job after SLURM's warning signal."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pandallm import slurm

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

    Under SLURM, a requeue signal (SIGUSR1, what `#SBATCH --signal=USR1@90` sends before the time limit) also
    requeues the job once the checkpoint is saved: global rank 0 runs `scontrol requeue` with the job's id
    (`ARRAYJOBID_TASKID` for an array task), and the requeued job resumes with `--ckpt_path last`. SIGTERM only
    stops: it is what `scancel` sends, and what SLURM sends when it preempts and requeues a job itself.
    Lightning's own SLURM auto-requeue is switched off (see `pandallm.slurm.disable_lightning_requeue`).
    """

    def __init__(self, signals: list[str] | None = None, requeue_signals: list[str] | None = None) -> None:
        """
        Args:
            signals: Signal names that stop the run; default SIGTERM and SIGUSR1 (SLURM's warning signal).
            requeue_signals: Those of `signals` after which a SLURM job requeues itself; default SIGUSR1.
        """
        self.signals = [getattr(signal, name) for name in (signals or ["SIGTERM", "SIGUSR1"])]
        self.requeue_signals = [getattr(signal, name) for name in (requeue_signals or ["SIGUSR1"])]
        self.received: int | None = None
        self._early: dict[int, Any] = {}
        self._previous: dict[int, Any] = {}
        self._step = -1
        self._saved = False
        self._requeue = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        slurm.disable_lightning_requeue(trainer)
        # Lightning leaves signals other than SIGTERM alone once its SLURM requeue is off, so they are caught from
        # here on: a warning signal during the sanity check stops the run after its first step instead of killing
        # it. SIGTERM is taken over in `on_train_start`, after Lightning has installed its own handler.
        early = [signum for signum in self.signals if signum != signal.SIGTERM]
        self._early = {signum: signal.signal(signum, self._handler) for signum in early}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own handlers, which save nothing and broadcast inside the handler.
        self._previous = {
            signum: signal.signal(signum, self._handler) for signum in self.signals if signum not in self._early
        }
        self._step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After Lightning's teardown, which puts back the handlers it found, `self._early` among them.
        self._restore_handlers()
        for signum, handler in self._early.items():
            signal.signal(signum, handler)
        self._early = {}

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._saved or trainer.global_step == self._step:  # mid gradient accumulation: not a place to stop
            return
        self._step = trainer.global_step
        # [stop requested, requeue requested], summed over ranks: the signal may have reached any of them.
        flags = [self.received is not None, self.received in self.requeue_signals]
        requested = torch.tensor(flags, dtype=torch.float32, device=pl_module.device)
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce(requested, reduce_op="sum")
        stop, requeue = requested.tolist()
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
            log.warning("pandallm: stopping on %s after step %d; saved %s", name, trainer.global_step, path)
        # The exit waits for the next hook: Lightning logs this step's metrics after `on_train_batch_end`.
        self._saved = True
        self._requeue = bool(requeue) and slurm.in_job()

    def _exit_if_saved(self, trainer: L.Trainer) -> None:
        if not self._saved:
            return
        if self._requeue and trainer.is_global_zero:
            # The checkpoint is complete on every rank (`save_checkpoint` ends with a barrier). The requeue ends
            # the job at once, so the logs are written first.
            for logger in trainer.loggers:
                logger.save()
            slurm.requeue(slurm.requeue_id())
        raise StoppedBySignal()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._exit_if_saved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_saved(trainer)  # before epoch-end validation and checkpointing: the stop checkpoint is saved

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """`last.ckpt` where the checkpoint callback writes, so that `--ckpt_path last` resumes from it."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        name = getattr(callback, "CHECKPOINT_NAME_LAST", "last") + getattr(callback, "FILE_EXTENSION", ".ckpt")
        return Path(directory) / name
