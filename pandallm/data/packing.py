"""Packing instruction rows into `max_seq_length` blocks.

Rows are never split: a block holds whole rows, each with its own `position_ids` starting at 0, so attention
stays inside each row exactly as for pretraining documents (see `pandallm.model.module.PandaLLM.forward`).
Rows are assigned to blocks by best-fit decreasing, which on Alpaca-like length distributions leaves a few
percent of padding, where batching rows as they come pads to the longest row of every batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from pandallm.data.encode import IGNORE_INDEX


def plan_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length at most `capacity` (best-fit decreasing)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: the tightest fit is found by bisection
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"row {index} has {length} tokens, more than the block of {capacity}")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, chosen = free.pop(at)
            bins[chosen].append(index)
            bisect.insort(free, (space - length, chosen))
        else:
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
    return bins


def pack_rows(rows: Sequence[dict], plan: list[list[int]]) -> Iterator[dict]:
    """The blocks of `plan`: rows concatenated, positions restarting at every row.

    Each row's first label is masked: standing alone it is never a target (nothing precedes it), and in a block
    it would make the previous row's last token predict the next row's first one.
    """
    for members in plan:
        block: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            row = rows[index]
            block["input_ids"] += row["input_ids"]
            block["labels"] += [IGNORE_INDEX, *row["labels"][1:]]
            block["position_ids"] += row["position_ids"]
        yield block
