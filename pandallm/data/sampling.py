"""The training order: which rows each rank reads in each epoch, the mixture of several sources, and the place a
resumed run continues from.

The order of epoch e is a pure function of the seed, e, and the sources' sizes and ratios. Nothing about it lives in
a random generator whose state would have to travel in checkpoints, so the only state of the data position is
`(epoch, rows of that epoch already read)`, and a resumed run rebuilds the very same order. (torchdata's stateful
loader restores a generator's state instead; resumed at or across an epoch boundary, its next epochs were shuffled
differently from the uninterrupted run's: tests/test_resume.py.)

Mixing (LLMBox's `dataset_ratio`): with ratios, each epoch draws `ratio_i / sum(ratios) * epoch_rows` rows from
source i, rounded down or up so that every epoch holds `epoch_rows` and, over epochs, each source its exact share. A
source is walked through a chain of seeded permutations of its rows, epoch after epoch, so a source
that contributes fewer rows than it holds is read whole over the following epochs before any row repeats, and one
that contributes more repeats each row as evenly as possible. The mixed rows are then shuffled together.

Repetition (online RL: PPO's `ppo_epochs`, GRPO's `num_iterations`): each optimizer step's rows of a rank (a
window of batch size x accumulation rows) are read `times` times in a row, so that as many optimizer steps train on
the completions sampled once for them (`pandallm.rl.buffer`). The rank's rows are first padded to whole windows by
wrapping around, as shards are, so that every window is complete and a step never mixes two rollouts.

Sharding: the epoch order is cut into strided per-rank shards (see `pandallm.data.sharding`): rank r reads
positions r, r + W, r + 2W, ... The k-th global batch is therefore positions [kWB, (k+1)WB) of the order,
whatever the number of ranks, and `rows_read` counts positions of the epoch order, not rows of one rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from pandallm.data.sharding import rank_positions
from pandallm.errors import DatasetError


def _permutation(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(list(seed)).permutation(n)


@dataclass(frozen=True)
class TrainingOrder:
    """The row order of every epoch over the concatenated rows of all sources."""

    sizes: tuple[int, ...]
    """Rows of each source, in the order the sources are concatenated."""
    ratios: tuple[float, ...] | None = None
    """Share of each source in an epoch (normalized); None: every row once per epoch."""
    epoch_rows: int | None = None
    """Rows per epoch with ratios; default: all rows of all sources."""
    seed: int = 42
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.ratios is not None:
            if len(self.ratios) != len(self.sizes):
                raise DatasetError(
                    f"data.mix_ratios has {len(self.ratios)} entries for {len(self.sizes)} training sources"
                )
            if any(r < 0 for r in self.ratios) or sum(self.ratios) <= 0:
                raise DatasetError(f"data.mix_ratios must be non-negative with a positive sum, got {list(self.ratios)}")
            empty = [i for i, (n, r) in enumerate(zip(self.sizes, self.ratios, strict=True)) if r > 0 and n == 0]
            if empty:
                raise DatasetError(f"training source(s) {empty} have a positive mix ratio but no rows")

    @property
    def length(self) -> int:
        """Rows per epoch."""
        if self.ratios is None or self.epoch_rows is None:
            return sum(self.sizes)
        return self.epoch_rows

    def source_counts(self, epoch: int = 0) -> list[int]:
        """Rows each source gives to epoch `epoch`, summing to `epoch_rows`: each source's exact share rounded down
        or up, with the rounded-up ones chosen so that over epochs every source reaches its ratio (`_extras`)."""
        if self.ratios is None:
            return list(self.sizes)
        base, _ = self._shares()
        return (base + self._extras(np.asarray([epoch]))[0]).tolist()

    def _shares(self) -> tuple[np.ndarray, np.ndarray]:
        """Each source's whole rows per epoch, and the fraction of a row left over (summing to a whole number)."""
        total = self.epoch_rows if self.epoch_rows is not None else sum(self.sizes)
        exact = np.asarray(self.ratios, dtype=np.float64) / sum(self.ratios) * total
        base = np.floor(exact).astype(np.int64)
        return base, exact - base

    def _extras(self, epochs: np.ndarray) -> np.ndarray:
        """Which sources get one row more than their whole rows, in each of `epochs` (one row of 0/1 per epoch).

        The leftover fractions r_i (each < 1, summing to R whole rows) are laid end to end on [0, R); the sources
        under the points phase + k (k = 0..R-1) get the extra rows, exactly R of them. The phase walks a
        low-discrepancy sequence (multiples of the golden ratio), so source i gets an extra row in a share r_i of
        the epochs, evenly spread: the same rounding in every epoch would favour the same sources for ever (three
        rows split 1:1 would be 2 and 1 in every epoch).
        """
        _, leftover = self._shares()
        extra_rows = int(round(leftover.sum()))
        ends = np.cumsum(leftover)
        phase = np.modf(epochs.astype(np.float64) * 0.6180339887498949)[0]
        points = phase[:, None] + np.arange(extra_rows)[None, :]  # epochs x R
        chosen = np.searchsorted(ends, points, side="right")
        extras = np.zeros((len(epochs), len(leftover)), dtype=np.int64)
        np.put_along_axis(extras, np.minimum(chosen, len(leftover) - 1), 1, axis=1)
        return extras

    def _rows_before(self, epoch: int) -> np.ndarray:
        """Rows each source gave to epochs 0 .. epoch - 1: where its chain of permutations continues."""
        base, _ = self._shares()
        return base * epoch + self._extras(np.arange(epoch)).sum(axis=0)

    def epoch(self, epoch: int) -> np.ndarray:
        """Positions in the concatenated rows, in the order epoch `epoch` reads them."""
        if self.ratios is None:
            total = sum(self.sizes)
            return _permutation(total, self.seed, epoch) if self.shuffle else np.arange(total)
        offsets = np.cumsum([0, *self.sizes[:-1]])
        counts, starts = self.source_counts(epoch), self._rows_before(epoch)
        parts = [
            offset + self._source_stream(source, size, int(start), count)
            for source, (offset, size, count, start) in enumerate(zip(offsets, self.sizes, counts, starts, strict=True))
            if count > 0
        ]
        mixed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return mixed[_permutation(len(mixed), self.seed, epoch)] if self.shuffle else mixed

    def _source_stream(self, source: int, size: int, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of source `source`'s endless chain of permutations of its rows."""
        pieces = []
        position, end = start, start + count
        while position < end:  # one contiguous slice per permutation touched: linear in `count`
            cycle, offset = divmod(position, size)
            take = min(size - offset, end - position)
            order = _permutation(size, self.seed, source, cycle) if self.shuffle else np.arange(size)
            pieces.append(order[offset : offset + take])
            position += take
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Repeat:
    """Each window of `window` consecutive rows of a rank, read `times` times in a row (see the module docstring)."""

    window: int
    times: int

    def rows(self, rows: int) -> int:
        """Rows read in place of `rows`: padded to whole windows, each read `times` times."""
        return math.ceil(rows / self.window) * self.window * self.times

    def apply(self, positions: np.ndarray) -> np.ndarray:
        if not len(positions):
            return positions
        padded = np.resize(positions, self.rows(len(positions)) // self.times)
        return np.repeat(padded.reshape(-1, self.window), self.times, axis=0).reshape(-1)


class EpochSampler(Sampler[int]):
    """Rank `rank`'s rows of each epoch of a `TrainingOrder`, from a given place.

    The epoch comes from Lightning, which calls `set_epoch` before each epoch's `iter()` (the first `iter()` of a
    `fit` comes before it: the data module creates the sampler with the epoch it starts in). What an `iter()`
    yields depends only on the epoch, never on how many times it was called: Lightning creates an iterator it
    does not use in some resumes, and again when it reloads the loaders. The rows already read apply to the epoch
    the run resumed in.
    """

    def __init__(
        self,
        order: TrainingOrder,
        rank: int,
        world_size: int,
        epoch: int = 0,
        rows_read: int = 0,
        repeat: Repeat | None = None,
    ) -> None:
        self.order = order
        self.repeat = repeat
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.resume = (epoch, rows_read)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        rows = math.ceil(self.order.length / self.world_size)
        return self.repeat.rows(rows) if self.repeat is not None else rows

    def __iter__(self) -> Iterator[int]:
        positions = rank_positions(self.order.epoch(self.epoch), self.rank, self.world_size)
        if self.repeat is not None:
            positions = self.repeat.apply(positions)
        resumed_epoch, rows_read = self.resume
        # Rows already read by all ranks together, as this rank's share of them (see the module docstring); with a
        # repetition, rows of the repeated stream, which is what training reads.
        skip = rows_read // self.world_size if self.epoch == resumed_epoch else 0
        return map(int, positions[skip:])
