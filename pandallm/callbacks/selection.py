"""Choosing the model by a validation metric: early stopping (`early_stopping.*`, universal-llm-trainer's
`early_stop_criterion`) and keeping the best checkpoint (`best_checkpoint.*`, its `load_model_type: best`).

Both watch any metric logged at validation: `val/loss`, `val/ppl`, or a generation metric (`val/bleu`,
`val/rougeL`, ...: `pandallm.callbacks.generation_metrics`). Both are off until a metric is named.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from pandallm.checkpoint.load import safe_load
from pandallm.errors import ConfigError

Mode = Literal["min", "max"]


class EarlyStop(EarlyStopping):
    def __init__(self, monitor: str | None = None, mode: Mode = "min", patience: int = 3, min_delta: float = 0.0):
        """
        Args:
            monitor: Stop `fit` when this validation metric (`val/loss`, `val/bleu`, ...) has not improved for
                `patience` validations in a row; null: never stop early.
            mode: `min` (a loss, a distance) or `max` (BLEU, ROUGE, exact match): which way is better.
            patience: Validations without improvement before stopping.
            min_delta: The least change that counts as an improvement.
        """
        if patience < 1:
            raise ConfigError(f"early_stopping.patience must be at least 1, got {patience}")
        super().__init__(
            monitor=monitor or "", mode=mode, patience=patience, min_delta=min_delta, check_on_train_epoch_end=False
        )
        self.enabled = monitor is not None

    def _validate_condition_metric(self, logs: dict) -> bool:
        if self.monitor not in logs:
            raise ConfigError(
                f"early_stopping.monitor '{self.monitor}' is not logged at validation; the metrics logged are "
                f"{sorted(logs)} (generation metrics need evaluation.metrics)"
            )
        return True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() if self.enabled else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled and state_dict:
            super().load_state_dict(state_dict)


class BestCheckpoint(L.Callback):
    def __init__(
        self,
        monitor: str | None = None,
        mode: Mode = "min",
        load_model_type: Literal["last", "best"] = "last",
        dirpath: str | None = None,
    ) -> None:
        """
        Args:
            monitor: Keep `best.ckpt`, the checkpoint of the best validation of this metric so far (`val/loss`,
                `val/bleu`, ...), beside the run's other checkpoints; null: none.
            mode: `min` or `max`: which way is better.
            load_model_type: What the model is when `fit` ends, and so what the Hugging Face export holds: `last`
                (the last weights) or `best` (the weights of `best.ckpt`).
            dirpath: Where `best.ckpt` goes; default the directory of the run's checkpoints (`checkpoints/` in the
                run directory without a `ModelCheckpoint`).
        """
        if load_model_type == "best" and monitor is None:
            raise ConfigError(
                "best_checkpoint.load_model_type 'best' needs best_checkpoint.monitor: the metric the best is by"
            )
        self.monitor = monitor
        self.mode = mode
        self.load_model_type = load_model_type
        self.dirpath = dirpath
        # Lightning's own top-1 checkpointing, driven from here: not one of the trainer's checkpoint callbacks, so
        # `--ckpt_path last` and the run's retention are as they were.
        self.checkpoint: ModelCheckpoint | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is None or stage != "fit":
            return
        if self.load_model_type == "best" and any(
            getattr(c, "average", None) is not None and getattr(c, "enabled", False) for c in trainer.callbacks
        ):
            raise ConfigError(
                "best_checkpoint.load_model_type 'best' and ema.enabled each choose the exported weights; use one"
            )
        dirpath = self.dirpath or next((c.dirpath for c in trainer.checkpoint_callbacks if c.dirpath), None)
        if dirpath is None:
            dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        self.checkpoint = ModelCheckpoint(
            dirpath=dirpath,
            filename="best",
            monitor=self.monitor,
            mode=self.mode,
            save_top_k=1,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        self.checkpoint.setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.checkpoint is None or trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise ConfigError(
                f"best_checkpoint.monitor '{self.monitor}' is not logged at validation; the metrics logged are "
                f"{sorted(trainer.callback_metrics)} (generation metrics need evaluation.metrics)"
            )
        self.checkpoint.on_validation_end(trainer, pl_module)

    @property
    def best_model_path(self) -> str:
        return self.checkpoint.best_model_path if self.checkpoint is not None else ""

    @contextmanager
    def export_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """With `load_model_type: best`, the weights of `best.ckpt` are loaded for the export, and stay: the model
        `fit` leaves is the best one."""
        if self.load_model_type == "best" and self.best_model_path:
            state = safe_load(self.best_model_path)["state_dict"]
            pl_module.load_state_dict(state, strict=pl_module.strict_loading)
        yield

    def state_dict(self) -> dict[str, Any]:
        return self.checkpoint.state_dict() if self.checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.checkpoint is not None and state_dict:
            self.checkpoint.load_state_dict(state_dict)
