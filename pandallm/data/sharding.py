"""Which rows each rank reads.

pandallm shards the data itself instead of letting Lightning inject a `DistributedSampler`: every rank reads a
strided shard of the epoch's order (training: `pandallm.data.sampling`; evaluation: `shard_indices` below), and the
position in that order goes into checkpoints. Resume is then the same mechanism with one process or many (with
Lightning's injected sampler, a DDP run resumed mid-epoch trained on other batches than the uninterrupted run; see
tests/test_resume.py).

With `data.shuffle: false`, rank r's k-th batch of B rows is rows {r + W(kB + i)}: over all W ranks, step k reads
rows [kWB, (k+1)WB), the same rows as the k-th batch of one process with batch size WB. That is how runs of
different world sizes are compared (tests/test_parallel.py).
"""

from __future__ import annotations

import math


def shard_indices(num_rows: int, rank: int, world_size: int, pad: bool) -> list[int]:
    """Rows `rank, rank + world_size, ...` of `num_rows`.

    With `pad`, every rank gets `ceil(num_rows / world_size)` rows, the shortest shards repeating rows from the
    start of the data (as `DistributedSampler` does), so that all ranks run the same number of training steps
    and none waits forever in a collective. Without it (evaluation), every row is read exactly once overall, so
    token-weighted metrics summed over ranks are exact.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    end = math.ceil(num_rows / world_size) * world_size if pad else num_rows
    return [i % num_rows for i in range(rank, end, world_size)] if num_rows else []
