"""Which rows each rank reads.

pandallm shards the data itself instead of letting Lightning inject a `DistributedSampler`: every rank reads a
strided shard (`rank_positions` below) of the epoch's order (training: `pandallm.data.sampling`) or of the rows
(evaluation), and the position in the training order goes into checkpoints. Resume is then the same mechanism with
one process or many (with Lightning's injected sampler, a DDP run resumed mid-epoch trained on other batches than
the uninterrupted run; see tests/test_resume.py).

With `data.shuffle: false`, rank r's k-th batch of B rows is rows {r + W(kB + i)}: over all W ranks, step k reads
rows [kWB, (k+1)WB), the same rows as the k-th batch of one process with batch size WB. That is how runs of
different world sizes are compared (tests/test_parallel.py).
"""

from __future__ import annotations

import math

import numpy as np


def rank_positions(order: np.ndarray, rank: int, world_size: int, pad: bool = True) -> np.ndarray:
    """Rank `rank`'s strided shard of `order`: its elements `rank, rank + world_size, ...`.

    With `pad` (training), every rank gets `ceil(len(order) / world_size)` of them, the shortest shards repeating
    elements from the start of the order (as `DistributedSampler` does), so that all ranks run the same number of
    training steps and none waits forever in a collective. Without it (evaluation), every element is read exactly
    once overall, so token-weighted metrics summed over ranks are exact.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if pad and len(order):
        order = np.resize(order, math.ceil(len(order) / world_size) * world_size)
    return order[rank::world_size]
