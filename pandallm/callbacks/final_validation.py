"""Validating after the last step of a run that `trainer.max_steps` ends inside an epoch."""

from __future__ import annotations

from typing import Any

import lightning as L


class FinalValidation(L.Callback):
    """A run stopped by `trainer.max_steps` in the middle of an epoch ends without a validation: Lightning validates
    at the end of an epoch (or every `val_check_interval`), and the last step is neither. Its final weights were never
    validated, and `ModelCheckpoint(monitor="val/loss")` keeps an older checkpoint as the best.

    After the last optimizer step, this asks the loop to stop (`trainer.should_stop`), which makes Lightning run the
    validation it runs before an early stop, at that step, if this epoch is one that validates
    (`check_val_every_n_epoch`); checkpoint callbacks then see its metrics. A step that validates anyway is left alone.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        if last_step and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer.should_stop = True
