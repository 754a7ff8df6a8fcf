"""Stopping on SIGTERM / SIGUSR1 in any phase of a run, never with status 0: with one complete checkpoint at an
optimizer-step boundary during training, at once while there is nothing to save; under SLURM, requeueing the job
after its warning signal.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from pandallm import slurm
from pandallm.stop import (  # noqa: F401 (EXIT_CODE_STOPPED: imported from here too)
    AFTER_THE_EXPORT,
    AFTER_THE_VALIDATION,
    AT_THE_NEXT_STEP,
    EXIT_CODE_STOPPED,
    STOP,
    StoppedBySignal,
)

log = logging.getLogger(__name__)


class _KeepHandlers(_SignalConnector):
    """Lightning's signal connector, minus its handlers. It would put its SIGTERM handler over pandallm's as every
    `fit` / `validate` / ... starts: one that raises `SystemExit` without a code (status 0) at its next check,
    saves nothing, and broadcasts a tensor from inside the handler."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False


class GracefulStop(L.Callback):
    """On a stop signal during training: finish the current optimizer step, save `last.ckpt` once, and exit 143.

    The save happens at the next optimizer-step boundary, where gradient accumulation is complete and the loop state
    is consistent. Ranks agree with one all-reduce per step, so a signal that reaches one rank stops all of them at
    the same step. A signal during a validation inside training is acted upon at the step after it. Before training
    (start-up, data preparation, the sanity check) there is nothing to save: the run stops at once. After the last
    step (the final validation, the export), the run stops when that phase ends, with `last.ckpt` holding the last
    step (saved then if the checkpoint callback has not). The handler and its phases: `StopSignals`.

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
        self._installed_here = False
        self._step = -1
        self._saved = False
        self._requeue = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before `fit` / `validate` / ... registers Lightning's handlers, which `_KeepHandlers` does not.
        trainer._signal_connector = _KeepHandlers(trainer)
        # `pandallm.cli.main` installed the handler at process start; a Python caller of `trainer.fit` did not.
        self._installed_here = STOP.install(self.signals, self.requeue_signals)
        STOP.is_global_zero = trainer.is_global_zero
        STOP.rank_label = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        STOP.launcher = trainer.strategy.launcher
        self._step, self._saved, self._requeue = -1, False, False
        if stage == "fit":
            slurm.disable_lightning_requeue(trainer)
            STOP.enter("start-up")
        else:
            STOP.enter(f"`{stage}`", f"stopping now; `{stage}` has nothing to save")
        STOP.check()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STOP.enter("the sanity check")

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STOP.check()
        STOP.enter("start-up")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STOP.check()
        STOP.enter("training", AT_THE_NEXT_STEP, at_once=False)
        self._step = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            STOP.enter("a validation", AFTER_THE_VALIDATION, at_once=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            STOP.enter("training", AT_THE_NEXT_STEP, at_once=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._saved or trainer.global_step == self._step:  # mid gradient accumulation: not a place to stop
            return
        self._step = trainer.global_step
        stop, requeue = self._requested(trainer)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        self._save(trainer, path)
        if trainer.is_global_zero:
            log.warning("pandallm: stopping on %s after step %d; saved %s", self._name(), trainer.global_step, path)
        # The exit waits for the next hook: Lightning logs this step's metrics after `on_train_batch_end`.
        self._saved = True
        self._requeue = requeue

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._exit_if_saved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_saved(trainer)  # before epoch-end validation and checkpointing: the stop checkpoint is saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal during the final validation, or after the last step's boundary.
        self._stop_after_training(trainer, "at the end of training")
        STOP.enter("the end of fit (the export)", AFTER_THE_EXPORT, at_once=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every `on_fit_end` hook, the export among them (it is complete: an interrupted one is never renamed
        # into place), and before `main` returns.
        if stage == "fit":
            self._stop_after_training(trainer, "at the end of fit, after the export")
        if self._installed_here:
            STOP.restore()
        else:
            STOP.enter("the end of the run", "stopping now; the run is complete")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._installed_here:
            STOP.restore()

    def _requested(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """(stop, requeue), agreed by every rank: the signal may have reached any of them."""
        flags = [STOP.received is not None, STOP.received in self.requeue_signals]
        # The root device, not the module's: after training, the strategy has moved the module to the CPU.
        requested = torch.tensor(flags, dtype=torch.float32, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce(requested, reduce_op="sum")
        stop, requeue = requested.tolist()
        return bool(stop), bool(requeue) and slurm.in_job()

    def _name(self) -> str:
        return STOP.name if STOP.received is not None else "a signal to another rank"

    def _save(self, trainer: L.Trainer, path: Path) -> None:
        STOP.saving = True  # a second signal waits for this checkpoint instead of losing it
        try:
            trainer.save_checkpoint(path)
        finally:
            STOP.saving = False

    def _stop_after_training(self, trainer: L.Trainer, when: str) -> None:
        stop, requeue = self._requested(trainer)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        saved = self._holds_last_step(trainer, path)
        if not saved:
            self._save(trainer, path)
        if trainer.is_global_zero:
            what = "it holds" if saved else "saved"
            log.warning(
                "pandallm: stopping on %s %s (step %d); %s %s", self._name(), when, trainer.global_step, what, path
            )
        self._saved, self._requeue = True, requeue
        self._exit_if_saved(trainer)

    @staticmethod
    def _holds_last_step(trainer: L.Trainer, path: Path) -> bool:
        """Whether a checkpoint callback wrote `path` at this step already (ModelCheckpoint's `save_last`)."""
        return any(
            getattr(callback, "last_model_path", None)
            and Path(callback.last_model_path) == path
            and getattr(callback, "_last_global_step_saved", None) == trainer.global_step
            and path.exists()
            for callback in trainer.checkpoint_callbacks
        )

    def _exit_if_saved(self, trainer: L.Trainer) -> None:
        if not self._saved:
            return
        if self._requeue and trainer.is_global_zero:
            # The checkpoint is complete on every rank (`save_checkpoint` ends with a barrier). The requeue ends
            # the job at once, so the logs are written first.
            for logger in trainer.loggers:
                logger.save()
            STOP.requeued = True
            slurm.requeue(slurm.requeue_id())
        raise StoppedBySignal()

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """`last.ckpt` where the checkpoint callback writes, so that `--ckpt_path last` resumes from it."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        name = getattr(callback, "CHECKPOINT_NAME_LAST", "last") + getattr(callback, "FILE_EXTENSION", ".ckpt")
        return Path(directory) / name
