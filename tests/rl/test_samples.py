"""Samples of rollouts: a JSON line per completion in the log directory, and a table for wandb."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pandallm.rl.samples import log_samples


class WandbLogger:  # the name is what `log_samples` recognises; wandb itself is not needed
    def __init__(self) -> None:
        self.tables: list[tuple] = []

    def log_table(self, key: str, columns: list[str], data: list[list]) -> None:
        self.tables.append((key, columns, data))


def test_samples_go_to_a_jsonl_file_and_a_wandb_table_on_rank_zero_only(tmp_path: Path) -> None:
    wandb = WandbLogger()
    trainer = SimpleNamespace(global_rank=0, loggers=[wandb], log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    rows = [{"prompt": "p", "completion": "c", "reward": 1.0, "f": 1.0}]
    log_samples(trainer, 5, rows)
    log_samples(SimpleNamespace(**{**vars(trainer), "global_rank": 1}), 5, rows)
    assert [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()] == [
        {"step": 5, "prompt": "p", "completion": "c", "reward": 1.0, "f": 1.0}
    ]
    assert wandb.tables == [("rollouts", ["step", "prompt", "completion", "reward", "f"], [[5, "p", "c", 1.0, 1.0]])]
