"""Samples of rollouts shown to the loggers: prompts, completions and their rewards, every N optimizer steps.

A wandb logger gets a table (`rollouts`); every run also gets `rollouts.jsonl` in its log directory (beside
`metrics.csv` for CSV runs), one line per completion, appended (a resumed run goes on in the same file).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def log_samples(trainer: Any, step: int, rows: list[dict[str, Any]]) -> None:
    """Write `rows` ({prompt, completion, reward, <reward name>...}) of optimizer step `step` (rank 0 only). Called by
    every rank: Lightning's `trainer.log_dir` is a broadcast from rank 0, which rank 0 alone would wait on forever."""
    if trainer is None:
        return
    directory = trainer.log_dir or trainer.default_root_dir
    if trainer.global_rank != 0 or not rows:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            columns = ["step", *rows[0]]
            logger.log_table(key="rollouts", columns=columns, data=[[step, *row.values()] for row in rows])
    path = Path(directory) / "rollouts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
