"""PointBudgetBatchSampler: budgets, coverage, determinism, exact length, distributed shards."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pcfm.data.sampler import PointBudgetBatchSampler
from pcfm.errors import DataError

SIZES = np.random.default_rng(0).integers(50, 1000, size=500)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("max_events", [None, 3])
def test_budget_respected_and_each_index_once(shuffle, max_events):
    sampler = PointBudgetBatchSampler(SIZES, 2500, shuffle=shuffle, max_events=max_events)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert all(SIZES[batch].sum() <= 2500 for batch in batches)
        assert all(1 <= len(batch) <= (max_events or len(SIZES)) for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(SIZES)))


def test_batches_are_closed_only_when_the_next_event_does_not_fit():
    sampler = PointBudgetBatchSampler(SIZES, 3000, seed=5)
    batches = list(sampler)
    for batch, following in zip(batches, batches[1:]):
        assert SIZES[batch].sum() + SIZES[following[0]] > 3000
    # Greedy packing fills batches well: the mean batch is over 80% of the budget here.
    assert np.mean([SIZES[batch].sum() for batch in batches[:-1]]) > 0.8 * 3000


def test_without_shuffle_batches_are_consecutive_indices():
    sampler = PointBudgetBatchSampler([4, 4, 4, 8, 1, 1, 1, 1, 5], 8, shuffle=False)
    assert list(sampler) == [[0, 1], [2], [3], [4, 5, 6, 7], [8]]


def test_oversized_event_goes_alone_with_one_warning():
    sizes = [3, 20, 4, 2, 30, 1]
    with pytest.warns(UserWarning, match=r"2 event\(s\) have more than max_points=10 points \(largest: 30"):
        sampler = PointBudgetBatchSampler(sizes, 10, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(sampler)
        sampler.set_epoch(1)
        list(sampler)
    assert batches == [[0], [1], [2, 3], [4], [5]]


def test_same_seed_and_epoch_give_same_batches_other_epochs_differ():
    first = PointBudgetBatchSampler(SIZES, 2500, seed=11)
    second = PointBudgetBatchSampler(SIZES, 2500, seed=11)
    assert epoch_batches(first, 0) == epoch_batches(second, 0)
    assert epoch_batches(first, 1) != epoch_batches(first, 0)
    assert epoch_batches(first, 0) == epoch_batches(second, 0)  # going back reproduces epoch 0
    assert epoch_batches(PointBudgetBatchSampler(SIZES, 2500, seed=12), 0) != epoch_batches(first, 0)
    # Epoch e of seed s is epoch 0 of seed s + e.
    assert epoch_batches(first, 3) == epoch_batches(PointBudgetBatchSampler(SIZES, 2500, seed=14), 0)


def test_drop_last_drops_the_final_batch():
    full = PointBudgetBatchSampler(SIZES, 2500, seed=1)
    dropped = PointBudgetBatchSampler(SIZES, 2500, seed=1, drop_last=True)
    assert list(dropped) == list(full)[:-1]
    assert len(dropped) == len(full) - 1


@pytest.mark.parametrize("num_replicas", [2, 3, 7])
def test_shards_are_disjoint_equal_and_cover_every_event(num_replicas):
    single = PointBudgetBatchSampler(SIZES, 2500, seed=2)
    shards = [PointBudgetBatchSampler(SIZES, 2500, seed=2, num_replicas=num_replicas, rank=r) for r in range(num_replicas)]
    for epoch in range(2):
        per_rank = [epoch_batches(shard, epoch) for shard in shards]
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(len(batches) == len(shard) for batches, shard in zip(per_rank, shards))
        events = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(events) == list(range(len(SIZES)))  # disjoint and covering
        assert all(SIZES[batch].sum() <= 2500 for batches in per_rank for batch in batches)
        # Only splits were added to equalise: at most num_replicas - 1 more batches than one rank alone.
        total = sum(len(batches) for batches in per_rank)
        assert 0 <= total - len(epoch_batches(single, epoch)) < num_replicas


def test_shards_with_drop_last_drop_whole_trailing_batches():
    single = epoch_batches(PointBudgetBatchSampler(SIZES, 2500, seed=3), 0)
    shards = [PointBudgetBatchSampler(SIZES, 2500, seed=3, num_replicas=4, rank=r, drop_last=True) for r in range(4)]
    per_rank = [list(shard) for shard in shards]
    kept = (len(single) - 1) // 4 * 4
    assert [len(batches) for batches in per_rank] == [kept // 4] * 4
    assert sorted(map(tuple, (b for batches in per_rank for b in batches))) == sorted(map(tuple, single[:kept]))


def test_more_replicas_than_events_repeats_single_events():
    shards = [PointBudgetBatchSampler([5, 5, 5], 100, shuffle=False, num_replicas=5, rank=r) for r in range(5)]
    per_rank = [list(shard) for shard in shards]
    assert per_rank == [[[0]], [[1]], [[2]], [[0]], [[1]]]
    assert Counter(i for batches in per_rank for batch in batches for i in batch) == {0: 2, 1: 2, 2: 1}


def test_empty_dataset_gives_no_batch():
    sampler = PointBudgetBatchSampler([], 100, num_replicas=2, rank=1)
    assert list(sampler) == [] and len(sampler) == 0


def test_feeds_a_dataloader():
    sizes = [3, 5, 2, 7, 1]
    dataset = TensorDataset(torch.arange(len(sizes)))
    loader = DataLoader(dataset, batch_sampler=PointBudgetBatchSampler(sizes, 8, shuffle=False))
    assert [batch[0].tolist() for batch in loader] == [[0, 1], [2], [3, 4]]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sizes": [3, 4, -1], "max_points": 10}, DataError, "<in-memory data>: event 2: negative point count -1"),
        ({"sizes": [[1, 2]], "max_points": 10}, ValueError, "sizes must be a 1-D sequence"),
        ({"sizes": [1.5, 2.0], "max_points": 10}, ValueError, "sizes must be integers"),
        ({"sizes": [1], "max_points": 0}, ValueError, "max_points must be an integer >= 1, got 0"),
        ({"sizes": [1], "max_points": 10, "max_events": 0}, ValueError, "max_events must be None or an integer >= 1"),
        ({"sizes": [1], "max_points": 10, "num_replicas": 2, "rank": 2}, ValueError, r"rank must be an integer in \[0, 2\)"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    sizes = kwargs.pop("sizes")
    with pytest.raises(error, match=message):
        PointBudgetBatchSampler(sizes, **kwargs)
