"""Training data for pretraining: files, an in-memory dataset, or simulated events, in point-budget batches.

:class:`PretrainDataModule` takes

- ``data``: file paths / globs / folders in any format :func:`pcfm.data.open_dataset` reads,
  or a map-style dataset of PyG ``Data`` point clouds (a torch Dataset or a plain list); or
- ``data=None``: events simulated on the fly, into memory, with the embedded simulators
  (:func:`simulate_pretraining_events`), the same events for the same seed.

It splits the events into a training and a validation part (seeded, disjoint), packs batches
up to a point budget (:class:`ResumableBatchSampler`, a
:class:`~pcfm.data.PointBudgetBatchSampler`) and shards them over the distributed processes
(``num_replicas`` and ``rank`` from the trainer), so ranks see disjoint events. The training
loader is resumable: a checkpoint records the epoch and the batches done in it, and a resumed
run continues with the next batch, not the start of the epoch.

Items are reduced to the fields pretraining uses (:data:`PRETRAIN_FIELDS`), so calorimeter
showers and LArTPC events (which carry different labels) can share a batch; each item gets
``event_id``, its index in the full dataset, which error messages quote.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from pcfm import geometry as geometries
from pcfm.data import PARTICLE_NAMES, PointBudgetBatchSampler, open_dataset
from pcfm.data.datasets import EventList  # noqa: F401  (also imported from here)
from pcfm.errors import DataError

#: Fields kept on every item (point fields, then event fields); missing event fields are filled
#: as unknown (NaN energies and angles, particle 0, geometry "").
PRETRAIN_FIELDS = ("pos", "x", "energy", "incident_energy", "theta", "phi", "particle", "geometry")
#: Geometry simulated when neither data nor a geometry is given.
DEFAULT_GEOMETRY = "calochallenge-ds2"
#: Particles simulated for calorimeter pretraining by default.
DEFAULT_PARTICLES = ("electron", "photon", "pion")
#: Default incident-energy range of simulated showers, MeV (log-uniform): 1 GeV to 100 GeV.
DEFAULT_ENERGY_RANGE_MEV = (1e3, 1e5)
#: Default polar-angle range of simulated showers, radians: normal incidence +- 0.3 rad.
DEFAULT_THETA_RANGE = (math.pi / 2 - 0.3, math.pi / 2 + 0.3)


def pretraining_item(data: Data, event_id: int) -> Data:
    """``data`` with only :data:`PRETRAIN_FIELDS` (unknown event fields filled) and ``event_id``."""
    def event_value(name, dtype, unknown):
        value = getattr(data, name, None)
        return torch.as_tensor(unknown if value is None else value, dtype=dtype).reshape(1)

    for name in ("pos", "x"):
        if getattr(data, name, None) is None:
            raise DataError(f"the point cloud has no {name!r} field (see pcfm.data.pointcloud)", event=event_id)
    energy = data.energy if getattr(data, "energy", None) is not None else torch.exp(data.x[:, 0])
    return Data(pos=data.pos, x=data.x, energy=energy,
                incident_energy=event_value("incident_energy", torch.float32, math.nan),
                theta=event_value("theta", torch.float32, math.nan), phi=event_value("phi", torch.float32, math.nan),
                particle=event_value("particle", torch.long, 0), geometry=getattr(data, "geometry", None) or "",
                event_id=torch.tensor([event_id]))


class PretrainingView(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset`` as :func:`pretraining_item` (a picklable view, for workers)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Data:
        index = int(self.indices[i])
        return pretraining_item(self.dataset[index], index)


class ConcatEvents(torch.utils.data.ConcatDataset):
    """Several event datasets as one, with the concatenated :meth:`event_sizes`."""

    def event_sizes(self) -> np.ndarray:
        return np.concatenate([event_sizes(dataset) for dataset in self.datasets])


def event_sizes(dataset) -> np.ndarray:
    """Points of each event: ``dataset.event_sizes()`` when it has one, else read every item once."""
    if hasattr(dataset, "event_sizes"):
        return np.asarray(dataset.event_sizes(), dtype=np.int64)
    return np.array([dataset[i].num_nodes for i in range(len(dataset))], dtype=np.int64)


def simulate_pretraining_events(geometry: str | Sequence[str] = DEFAULT_GEOMETRY, n_events: int = 1024, *,
                                particles: Sequence[str] = DEFAULT_PARTICLES,
                                energy_range: tuple[float, float] = DEFAULT_ENERGY_RANGE_MEV,
                                theta_range: float | tuple[float, float] = DEFAULT_THETA_RANGE,
                                lartpc_points: Optional[tuple[int, int]] = None, seed: int = 0):
    """Events simulated into memory for pretraining, ``n_events`` per geometry, as one dataset.

    A calorimeter geometry gets :func:`pcfm.sim.simulate_showers` of ``particles`` (drawn at
    random per shower) with log-uniform energies in ``energy_range`` (MeV) and polar angles
    uniform in ``theta_range`` (radians; a number fixes it); "lartpc-768" (any voxel grid) gets
    :func:`pcfm.sim.simulate_lartpc_events`, grown to ``lartpc_points=(lo, hi)`` points when
    given. Geometry ``g`` (0, 1, ...) draws from ``seed + g``. The geometry chooses its
    simulator (:meth:`pcfm.geometry.Geometry.simulate_events`).
    """
    names = [geometry] if isinstance(geometry, str) else list(geometry)
    codes = {name: code for code, name in PARTICLE_NAMES.items()}
    unknown = [p for p in particles if p not in codes]
    if unknown:
        raise ValueError(f"unknown particle(s) {unknown}; choose from {sorted(codes)}")
    parts = []
    for offset, name in enumerate(names):
        geo = geometries.get(name)
        rng = np.random.default_rng(seed + offset)
        parts.append(geo.simulate_events(n_events, rng, particles=np.array([codes[p] for p in particles]), energy_range=tuple(energy_range),
                                         theta_range=theta_range, target_points=lartpc_points))
    return parts[0] if len(parts) == 1 else ConcatEvents(parts)


def split_indices(candidates: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, validation) index arrays: a seeded permutation of ``candidates``, the first
    ``round(val_fraction * n)`` (at least 1 when ``val_fraction > 0`` and n >= 2) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(candidates)
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class ResumableBatchSampler(PointBudgetBatchSampler):
    """A :class:`~pcfm.data.PointBudgetBatchSampler` that can skip the batches already done.

    :meth:`skip` sets the epoch and asks the next iteration to start at batch ``done``; the
    batches are a function of the seed and epoch, so this continues an interrupted epoch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip: Optional[tuple[int, int]] = None

    @property
    def sampler(self) -> "ResumableBatchSampler":
        """Itself: Lightning sets the epoch through ``loader.batch_sampler.sampler.set_epoch``."""
        return self

    def skip(self, epoch: int, done: int) -> None:
        self.set_epoch(epoch)
        self._skip = (int(epoch), int(done))

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        for batch in self._rank_batches()[start:]:
            yield batch.tolist()


class ResumableLoader(DataLoader):
    """A PyG DataLoader whose checkpoint state is (epoch, batches done in it) of its sampler.

    Lightning calls :meth:`state_dict` when it saves a checkpoint and :meth:`load_state_dict`
    when it resumes; ``batches_done`` reads how many batches the training loop has consumed
    (not how many the loader has prefetched).
    """

    def __init__(self, dataset, batch_sampler: ResumableBatchSampler, batches_done: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.skip(state["epoch"], state["batches_done"])


class PretrainDataModule(L.LightningDataModule):
    """Training and validation loaders for :class:`~pcfm.tasks.pretrain.PretrainModule` (module docstring).

    Args:
        data: files / globs / folders (any format of :func:`pcfm.data.open_dataset`), a
            dataset of PyG ``Data`` (torch Dataset or list), or None to simulate.
        geometry: geometries to simulate (name or list) when ``data`` is None (default
            :data:`DEFAULT_GEOMETRY`); with files, a name given here overrides the one
            :func:`~pcfm.data.open_dataset` finds per file.
        n_events: simulated events per geometry.
        particles, energy_range, theta_range, lartpc_points: see :func:`simulate_pretraining_events`.
        val_fraction: share of the events held out for validation (0: no validation).
        batch_points: point budget of a batch.
        max_events: also cap the events of a batch (None: no cap).
        min_points: events with fewer points are left out (an empty shower has nothing to learn).
        num_workers: DataLoader worker processes (0: load in the training process).
        seed: seeds the simulation, the split and the batch order.
        dataset_options: more keywords for :func:`~pcfm.data.open_dataset` (``on_error``, ...).
    """

    def __init__(self, data: Any = None, *, geometry: str | Sequence[str] | None = None,
                 n_events: int = 1024, particles: Sequence[str] = DEFAULT_PARTICLES,
                 energy_range: tuple[float, float] = DEFAULT_ENERGY_RANGE_MEV,
                 theta_range: float | tuple[float, float] = DEFAULT_THETA_RANGE,
                 lartpc_points: Optional[tuple[int, int]] = None, val_fraction: float = 0.1,
                 batch_points: int = 20_000, max_events: Optional[int] = None, min_points: int = 1,
                 num_workers: int = 0, seed: int = 0, dataset_options: Optional[dict] = None):
        super().__init__()
        if batch_points < 1:
            raise ValueError(f"batch_points must be >= 1, got {batch_points}")
        self.data = data
        self.geometry = geometry
        self.simulation = dict(n_events=n_events, particles=tuple(particles), energy_range=tuple(energy_range),
                               theta_range=theta_range, lartpc_points=lartpc_points)
        self.val_fraction = float(val_fraction)
        self.batch_points = int(batch_points)
        self.max_events = max_events
        self.min_points = int(min_points)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.dataset_options = dict(dataset_options or {})
        self.dataset = None
        self.train_dataset: Optional[PretrainingView] = None
        self.val_dataset: Optional[PretrainingView] = None
        self._train_sizes = self._val_sizes = None

    def _open(self):
        """The full dataset from ``data`` (or the simulator)."""
        if self.data is None:
            return simulate_pretraining_events(self.geometry or DEFAULT_GEOMETRY, seed=self.seed, **self.simulation)
        return self._open_given(self.data)

    def _open_given(self, data, name: str = "data"):
        """A dataset from file paths / globs / folders, a list of ``Data`` or a map-style dataset."""
        if isinstance(data, (str, os.PathLike)) or (
                isinstance(data, (list, tuple)) and data and isinstance(data[0], (str, os.PathLike))):
            options = dict(self.dataset_options)
            if self.geometry is not None:
                if not isinstance(self.geometry, str):
                    raise ValueError(f"with files, geometry must be one name (or None), got {self.geometry!r}")
                options.setdefault("geometry", self.geometry)
            return open_dataset(data, **options)
        if isinstance(data, (list, tuple)):
            return EventList(data)
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(f"{name} must be file paths, a map-style dataset of Data or None, got {type(data)}")
        return data

    def setup(self, stage: Optional[str] = None) -> None:
        """Open (or simulate) the data once and split it; later calls do nothing."""
        if self.dataset is not None:
            return
        dataset = self._open()
        sizes = event_sizes(dataset)
        candidates = np.flatnonzero(sizes >= self.min_points)
        if len(candidates) == 0:
            raise DataError(f"no event has at least min_points={self.min_points} points "
                            f"(of {len(sizes)} events)")
        train, val = split_indices(candidates, self.val_fraction, self.seed)
        self.dataset = dataset
        self.train_dataset, self.val_dataset = PretrainingView(dataset, train), PretrainingView(dataset, val)
        self._train_sizes, self._val_sizes = sizes[train], sizes[val]

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _batches_done(self) -> int:
        """Training batches completed in the current epoch, as the trainer counts them."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _workers(self) -> dict[str, Any]:
        return dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        num_replicas, rank = self._replicas()
        sampler = ResumableBatchSampler(self._train_sizes, self.batch_points, shuffle=True, seed=self.seed,
                                        max_events=self.max_events, num_replicas=num_replicas, rank=rank)
        return ResumableLoader(self.train_dataset, sampler, self._batches_done, **self._workers())

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_dataset) == 0:
            return []
        num_replicas, rank = self._replicas()
        sampler = PointBudgetBatchSampler(self._val_sizes, self.batch_points, shuffle=False,
                                          max_events=self.max_events, num_replicas=num_replicas, rank=rank)
        return DataLoader(self.val_dataset, batch_sampler=sampler, **self._workers())
