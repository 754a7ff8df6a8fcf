"""Writing `pandallm predict` outputs as JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: Output file of JSON lines, one per prompt: `{"input", "output"}` for pandallm `{"input"}`
                records, `{"prompt": [{"role", "content"}, ...], "output"}` for the other formats, with
                `"reference"` (the record's own reply) when the record has one; default `predictions.jsonl` in the run
                directory. With several ranks each writes its own file, suffixed `.rankN`.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self._resolved: Path | None = None

    def _file(self, trainer: L.Trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resolved once, on every rank: `trainer.log_dir` is a collective under DDP.
        self._resolved = self._file(trainer)
        self._resolved.parent.mkdir(parents=True, exist_ok=True)
        self._resolved.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx):
        with self._resolved.open("a", encoding="utf-8") as f:
            for item in prediction:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
