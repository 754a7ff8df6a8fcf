"""Batching rows into tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pandallm.data.encode import IGNORE_INDEX


def collate_rows(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest row of the batch (not to `max_seq_length`).

    Padding has `labels = -100`, `attention_mask = 0`, and positions that continue the row's last document, so
    that `position_ids` alone still mark where documents start (a restart at 0) and padding never does.
    """
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        positions = torch.as_tensor(row["position_ids"])
        position_ids[i, :n] = positions
        position_ids[i, n:] = positions[-1] + 1 + torch.arange(length - n)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def collate_prompts(rows: Sequence[dict], pad_id: int) -> dict:
    """Left-pad prompts for generation, so that every row's next token is at the same (last) position."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, length - n :] = torch.as_tensor(row["input_ids"])
        attention_mask[i, length - n :] = 1
    # What the prediction writer shows beside each output: the prompt as the record gave it, and its reference.
    shown = {key: [row[key] for row in rows] for key in ("prompt", "reference")}
    return {"input_ids": input_ids, "attention_mask": attention_mask, **shown}
