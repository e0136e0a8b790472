"""Batches of events capped by their total number of points, not by their number of events.

Events of a LArTPC data set range from ~5k to ~95k points: a fixed number of events per batch
either wastes memory on small events or runs out of it on large ones. Packing events up to a
point budget keeps every batch near the same memory use.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from pcfm.errors import DataError


class PointBudgetBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices whose point counts sum to at most ``max_points``.

    Each epoch the indices are put in order (a permutation drawn from ``seed + epoch`` when
    ``shuffle``, else ``0, 1, ...``) and cut greedily into consecutive batches: a batch is
    closed when the next event would exceed ``max_points`` or ``max_events``. An event larger
    than ``max_points`` goes alone in its own batch (one warning when the sampler is built).
    The same ``seed`` and epoch (see :meth:`set_epoch`) always give the same batches.

    ``drop_last`` drops the epoch's final batch, the one closed by running out of events
    instead of by the budget.

    Distributed training (``num_replicas`` > 1): every rank builds the same global list of
    batches and takes every ``num_replicas``-th batch starting at ``rank``, so the ranks' batches
    are disjoint. To give every rank the same number of batches:

    * ``drop_last=False``: batches are split in two, the batch with the most events first, until
      their count is a multiple of ``num_replicas``; no event is dropped or repeated. Only when
      there are fewer events than needed batches are single-event batches repeated, taken from
      the start of the epoch's list (those events then appear twice in the epoch).
    * ``drop_last=True``: after dropping the final batch, the last ``count % num_replicas``
      batches are dropped too.

    Args:
        sizes: number of points of each event of the dataset (>= 0).
        max_points: point budget of a batch (>= 1).
        shuffle: draw a new event order each epoch.
        seed: base seed of the shuffle; epoch ``e`` uses ``seed + e``.
        drop_last: see above.
        max_events: also cap the number of events of a batch (``None``: no cap).
        num_replicas, rank: the number of distributed processes and this one's index.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        max_points: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_events: Optional[int] = None,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        self.sizes = _check_sizes(sizes)
        for name, value in (("max_points", max_points), ("num_replicas", num_replicas)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_events is not None and (not _is_int(max_events) or max_events < 1):
            raise ValueError(f"max_events must be None or an integer >= 1, got {max_events!r}")
        if not _is_int(rank) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, {num_replicas}), got {rank!r}")
        self.max_points = int(max_points)
        self.max_events = None if max_events is None else int(max_events)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._cached: tuple[int, list[np.ndarray]] | None = None

        oversized = np.flatnonzero(self.sizes > self.max_points)
        if len(oversized):
            warnings.warn(
                f"{len(oversized)} event(s) have more than max_points={self.max_points} points "
                f"(largest: {int(self.sizes.max())}, dataset index {int(oversized[0])} first); "
                "each goes alone in its own batch",
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._rank_batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._rank_batches())

    def _rank_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch (built once per epoch)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._global_batches()[self.rank :: self.num_replicas])
        return self._cached[1]

    def _global_batches(self) -> list[np.ndarray]:
        """All ranks' batches of the epoch, their count a multiple of ``num_replicas``."""
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.sizes))
        else:
            order = np.arange(len(self.sizes))
        batches = _pack(order, self.sizes[order], self.max_points, self.max_events)
        if self.drop_last:
            batches = batches[:-1]
            return batches[: len(batches) - len(batches) % self.num_replicas]
        return _equalise(batches, self.num_replicas)


def _pack(
    order: np.ndarray, sizes: np.ndarray, max_points: int, max_events: Optional[int]
) -> list[np.ndarray]:
    """Cut ``order`` greedily into consecutive batches within the budgets (a loop over batches)."""
    ends_before = np.concatenate([[0], np.cumsum(sizes)])  # points before each position
    batches, start = [], 0
    while start < len(order):
        # The last position whose cumulative count stays within the budget; at least one event.
        end = int(np.searchsorted(ends_before, ends_before[start] + max_points, side="right")) - 1
        end = max(end, start + 1)
        if max_events is not None:
            end = min(end, start + max_events)
        batches.append(order[start:end])
        start = end
    return batches


def _equalise(batches: list[np.ndarray], num_replicas: int) -> list[np.ndarray]:
    """Make the batch count a multiple of ``num_replicas`` by splitting, else repeating, batches."""
    batches = list(batches)
    while len(batches) % num_replicas:
        lengths = np.array([len(batch) for batch in batches])
        largest = int(lengths.argmax()) if len(batches) else -1
        if largest < 0 or lengths[largest] < 2:
            break
        half = (lengths[largest] + 1) // 2
        batch = batches[largest]
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    missing = -len(batches) % num_replicas
    if missing and batches:
        batches += [batches[i % len(batches)] for i in range(missing)]
    return batches


def _check_sizes(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(sizes)
    if array.ndim != 1:
        raise ValueError(f"sizes must be a 1-D sequence of point counts, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"sizes must be integers, got dtype {array.dtype}")
    negative = np.flatnonzero(array < 0)
    if len(negative):
        raise DataError(f"negative point count {int(array[negative[0]])}", event=int(negative[0]))
    return array.astype(np.int64)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
