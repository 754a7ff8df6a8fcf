"""Shared pieces of the benchmarks: the machine description and the JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

import lightning
import torch
import transformers
from torch.utils.data import DataLoader

from pandallm.data.collate import collate_rows


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_result(name: str, result: dict) -> Path:
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**environment(), **result}, indent=2, ensure_ascii=False) + "\n")
    return out


def prepare_in_order(datamodule, batch_size: int):
    """Set `datamodule` up for fit and make it serve the training rows in file order, unshuffled, so that every
    side of a comparison sees the same batches."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.train_dataloader = lambda: DataLoader(
        datamodule.datasets["train"],
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate_rows, pad_id=datamodule.pad_id),
    )
    return datamodule
