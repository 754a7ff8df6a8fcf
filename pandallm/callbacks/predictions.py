"""Writing `pandallm predict` outputs as JSON Lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


def run_directory_of(ckpt_path: str | Path) -> Path:
    """The run a checkpoint file belongs to: the directory above `checkpoints/` (the recipes' `runs/<name>/`, or
    Lightning's `version_N/`), else the checkpoint's own directory."""
    directory = Path(ckpt_path).parent
    return directory.parent if directory.name == "checkpoints" else directory


class PredictionWriter(BasePredictionWriter):
    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: Output file of JSON lines, one per prompt: `{"input", "output"}` for pandallm `{"input"}`
                records, `{"prompt": [{"role", "content"}, ...], "output"}` for the other formats, with
                `"reference"` (the record's own reply) when the record has one; `pandallm predict --output` sets it
                too. Default: `predictions.jsonl` in the directory of the run the checkpoint came from (`--ckpt_path
                runs/tiny/checkpoints/last.ckpt`: `runs/tiny/predictions.jsonl`), else in the logger's directory.
                With several ranks each writes its own file, suffixed `.rankN`.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self._resolved: Path | None = None
        self._written = 0

    def _file(self, trainer: L.Trainer) -> Path:
        if self.path:
            path = Path(self.path)
        elif trainer.ckpt_path and Path(trainer.ckpt_path).exists():
            path = run_directory_of(trainer.ckpt_path) / "predictions.jsonl"
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resolved once, on every rank: `trainer.log_dir` is a collective under DDP.
        self._resolved = self._file(trainer)
        self._resolved.parent.mkdir(parents=True, exist_ok=True)
        self._resolved.write_text("")
        self._written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx):
        with self._resolved.open("a", encoding="utf-8") as f:
            for item in prediction:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._written += len(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("pandallm predict: %d predictions written to %s", self._written, self._resolved)
