"""Collectives that pandallm's checkpoint state needs beyond Lightning's."""

from __future__ import annotations

from typing import Any

import torch


def gather_from_ranks(local: Any) -> list[Any]:
    """`local` (picklable) of every rank, on every rank, in rank order; `[local]` without a process group. Only rank
    0 writes a checkpoint, so state that differs per rank is gathered into it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered
