"""The training order: mixtures, per-rank shards, and the place a resumed run continues from."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pandallm.data.sampling import EpochSampler, TrainingOrder, rank_positions
from pandallm.errors import DatasetError


def source_of(position: int, sizes: tuple[int, ...]) -> int:
    return int(np.searchsorted(np.cumsum(sizes), position, side="right"))


def test_without_ratios_every_row_is_read_once_per_epoch_in_a_new_order_each_epoch() -> None:
    order = TrainingOrder(sizes=(7, 5), seed=3)
    epochs = [order.epoch(e).tolist() for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert order.epoch(1).tolist() == epochs[1]  # a pure function of (seed, epoch): what a resumed run relies on
    assert TrainingOrder(sizes=(7, 5), shuffle=False).epoch(4).tolist() == list(range(12))


def test_mixture_proportions_follow_the_ratios_over_many_epochs() -> None:
    sizes = (1000, 50, 300)
    order = TrainingOrder(sizes=sizes, ratios=(0.5, 0.3, 0.2), epoch_rows=97, seed=1)
    counts = collections.Counter(source_of(p, sizes) for e in range(40) for p in order.epoch(e).tolist())
    total = sum(counts.values())
    assert total == 40 * 97
    shares = [counts[i] / total for i in range(3)]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.01)


def test_shares_of_fractional_rows_reach_their_ratios_over_epochs() -> None:
    """Rounded alike in every epoch, 3 rows at 1:1 would be 2 and 1 for ever, and 1 row over three sources would
    never read two of them."""
    for sizes, ratios, rows in (((2, 3), (1, 1), 3), ((5, 2, 3), (1, 1, 1), 1), ((1000, 50, 300), (5, 3, 2), 97)):
        order = TrainingOrder(sizes=sizes, ratios=ratios, epoch_rows=rows, seed=1)
        per_epoch = [order.source_counts(e) for e in range(300)]
        assert all(sum(counts) == rows == len(order.epoch(e)) for e, counts in enumerate(per_epoch))
        shares = [sum(c[i] for c in per_epoch) / (300 * rows) for i in range(len(sizes))]
        assert shares == pytest.approx([r / sum(ratios) for r in ratios], abs=0.01)
        # Each epoch continues every source's chain where the epochs before it stopped.
        seen = collections.Counter(source_of(p, sizes) for e in range(20) for p in order.epoch(e).tolist())
        assert [seen[i] for i in range(len(sizes))] == [sum(c[i] for c in per_epoch[:20]) for i in range(len(sizes))]


def test_a_downsampled_source_is_read_whole_before_any_row_repeats() -> None:
    order = TrainingOrder(sizes=(10, 100), ratios=(1, 1), epoch_rows=20, seed=5)
    assert order.source_counts() == [10, 10]
    seen = [p - 10 for e in range(10) for p in order.epoch(e).tolist() if p >= 10]
    assert sorted(seen) == list(range(100))  # ten epochs of ten rows: each of the 100 rows exactly once


def test_an_upsampled_source_repeats_its_rows_evenly() -> None:
    order = TrainingOrder(sizes=(10, 90), ratios=(1, 3), epoch_rows=100, seed=5)
    assert order.source_counts() == [25, 75]
    small = collections.Counter(p for p in order.epoch(0).tolist() if p < 10)
    assert set(small.values()) <= {2, 3} and sum(small.values()) == 25


def test_bad_ratios_are_refused() -> None:
    with pytest.raises(DatasetError, match="2 entries for 3 training sources"):
        TrainingOrder(sizes=(1, 2, 3), ratios=(1, 1))
    with pytest.raises(DatasetError, match="non-negative with a positive sum"):
        TrainingOrder(sizes=(1, 2), ratios=(1, -1))
    with pytest.raises(DatasetError, match=r"source\(s\) \[1\] have a positive mix ratio but no rows"):
        TrainingOrder(sizes=(4, 0), ratios=(1, 1))


def test_rank_shards_cover_the_epoch_and_have_equal_lengths() -> None:
    order = TrainingOrder(sizes=(11,), seed=2).epoch(0)
    shards = [rank_positions(order, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {4}
    # Every row once, and the shortest shard padded with the first row of the epoch order.
    assert sorted(np.concatenate(shards).tolist()) == sorted([*order.tolist(), int(order[0])])


def test_the_sampler_follows_set_epoch_and_resumes_from_rows_read() -> None:
    order = TrainingOrder(sizes=(6, 6), ratios=(2, 1), epoch_rows=12, seed=0)
    sampler = EpochSampler(order, rank=1, world_size=2)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)  # as Lightning does before each epoch
        epochs.append(list(sampler))
    assert epochs == [rank_positions(order.epoch(e), 1, 2).tolist() for e in range(3)]
    assert list(sampler) == epochs[2]  # another iter() of the same epoch (a reload, an unused iterator): the same
    # 2 ranks x 2 batches of 2 rows read in epoch 1: this rank continues after its own 4 rows.
    resumed = EpochSampler(order, rank=1, world_size=2, epoch=1, rows_read=8)
    assert list(resumed) == list(resumed) == epochs[1][4:]
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
