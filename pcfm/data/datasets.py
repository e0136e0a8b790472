"""Torch datasets that yield PyG point clouds (:mod:`pcfm.data.pointcloud`) for training.

* :class:`ShowerDataset`: showers already in memory (a :class:`CaloShowers`).
* :class:`CaloChallengeDataset`: CaloChallenge files read lazily, one event per item, through
  per-process HDF5 handles, for data sets far larger than memory.
* :class:`LArTPCDataset`: PILArNet-M files, read by :class:`pcfm.data.pilarnet.PILArNetDataset`.

All work with ``torch.utils.data.DataLoader`` workers (fork or spawn) and PyG's collater
(``torch_geometric.loader.DataLoader``). :meth:`event_sizes` gives the points per item for a
point-budget batch sampler.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import h5py
import numpy as np
import torch
from torch_geometric.data import Data

from pcfm import geometry as geometries
from pcfm.data.calochallenge import (FileLayout, block_events_for, count_cells_in_blocks, inspect_file,
                                      read_valid_block)
from pcfm.data.events import CaloShowers
from pcfm.data.hdf5 import LazyEventDataset, LazyH5, PathLike
from pcfm.data.pointcloud import cells_to_data, lartpc_to_data, shower_to_data
from pcfm.errors import DataError, GeometryError

Transform = Optional[Callable[[Data], Any]]


class EventList(torch.utils.data.Dataset):
    """A list of ``Data`` point clouds as a dataset with :meth:`event_sizes`."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Data:
        return self.items[i]

    def event_sizes(self) -> np.ndarray:
        return np.array([item.num_nodes for item in self.items], dtype=np.int64)


def _threshold(geometry, threshold: Optional[float]) -> float:
    return geometry.readout_threshold_mev if threshold is None else float(threshold)


class ShowerDataset(torch.utils.data.Dataset):
    """In-memory showers as point clouds: item ``i`` is :func:`shower_to_data` of shower ``i``.

    ``geometry`` defaults to ``showers.geometry``; ``threshold`` to its readout threshold.
    """

    def __init__(self, showers: CaloShowers, geometry=None, *, threshold: Optional[float] = None,
                 transform: Transform = None):
        geometry = geometry if geometry is not None else showers.geometry
        if geometry is None:
            raise GeometryError("the showers name no geometry: pass geometry=")
        self.showers = showers
        self.geometry = geometries.get(geometry)
        if showers.showers.shape[1] != self.geometry.n_cells:
            raise DataError(f"showers have {showers.showers.shape[1]} cells, geometry "
                            f"{self.geometry.name!r} has {self.geometry.n_cells}")
        self.threshold = _threshold(self.geometry, threshold)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.showers)

    def __getitem__(self, i: int) -> Any:
        data = shower_to_data(self.showers, i, self.geometry, threshold=self.threshold)
        return data if self.transform is None else self.transform(data)

    def event_sizes(self) -> np.ndarray:
        """Points (cells kept by the threshold) of each shower."""
        return count_cells_in_blocks(self.showers.showers, 0, len(self), self.threshold,
                                     block_events_for(self.geometry.n_cells))


class CaloChallengeDataset(LazyEventDataset):
    """Showers of one or many CaloChallenge files as point clouds, read one event per item.

    Args:
        paths_or_globs: files, glob patterns or folders (:func:`pcfm.data.hdf5.expand_paths`).
        geometry: the geometry of every file; default per file as in
            :func:`~pcfm.data.calochallenge.read_calochallenge` (files may then differ).
        threshold: cells kept as points (> 0 and >= threshold); default each geometry's readout
            threshold.
        transform, min_points, on_error: as in :class:`~pcfm.data.hdf5.LazyEventDataset`
            (``on_error="skip"`` returns the next good event in place of a bad one).

    Construction reads only the file shapes. Each event is validated when read (a bad one raises
    a DataError naming file and event). :meth:`event_sizes` counts the cells kept per event in
    blocks of about 64 MB, once (then cached).
    """

    keys = ("incident_energies", "showers")

    def __init__(self, paths_or_globs: PathLike | Iterable[PathLike], geometry=None, *,
                 threshold: Optional[float] = None, transform: Transform = None, min_points: int = 0,
                 on_error: str = "raise"):
        self.geometry = None if geometry is None else geometries.get(geometry)
        self.threshold = threshold
        super().__init__(paths_or_globs, transform=transform, min_points=min_points, on_error=on_error)

    def _inspect(self, h5file: h5py.File, path: Path) -> FileLayout:
        return inspect_file(h5file, path, self.geometry)

    def _read(self, h5: LazyH5, index: int, layout: FileLayout) -> Data:
        incident, showers, extras = read_valid_block(h5, layout, h5.path, index, index + 1)
        extra = {key: values[0] for key, values in extras.items()}
        return cells_to_data(showers[0], float(incident[0]), layout.geometry,
                             threshold=_threshold(layout.geometry, self.threshold), **extra)

    def _count_points(self, h5file: h5py.File, start: int, stop: int, layout: FileLayout) -> np.ndarray:
        return count_cells_in_blocks(h5file["showers"], start, stop, _threshold(layout.geometry, self.threshold),
                                     block_events_for(layout.n_voxels))

    @property
    def file_geometries(self) -> list[str]:
        """Geometry name of each file, in the order of :attr:`paths`."""
        return [layout.geometry.name for layout in self.file_info]


class LArTPCDataset(torch.utils.data.Dataset):
    """PILArNet-M events as point clouds (:func:`~pcfm.data.pointcloud.lartpc_to_data`).

    A thin wrapper: ``events`` is a :class:`pcfm.data.pilarnet.PILArNetDataset` built from
    ``paths_or_globs`` and ``**reader_options`` (``min_points``, ``on_error``, ...), which does
    the lazy reading and validation; a voxel-grid geometry's shape bounds the coordinates.
    """

    def __init__(self, paths_or_globs, geometry="lartpc-768", *, transform: Transform = None, **reader_options):
        from pcfm.data.pilarnet import PILArNetDataset  # the reader is optional for calorimeter users

        self.geometry = geometries.get(geometry)
        if isinstance(self.geometry, geometries.VoxelGridGeometry):
            reader_options.setdefault("box_voxels", self.geometry.shape)
        self.events = PILArNetDataset(paths_or_globs, **reader_options)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, i: int) -> Any:
        data = lartpc_to_data(self.events[i], self.geometry)
        return data if self.transform is None else self.transform(data)

    def event_sizes(self) -> np.ndarray:
        """Points of each event (all points are kept by the conversion)."""
        return self.events.event_sizes()

    def scan(self):
        """Validate every event; see :meth:`pcfm.data.hdf5.LazyEventDataset.scan`."""
        return self.events.scan()


def open_calochallenge(paths: list, geometry, transform, **options) -> CaloChallengeDataset:
    """The :data:`~pcfm.data.formats.FORMATS` opener of CaloChallenge files."""
    return CaloChallengeDataset(paths, geometry, transform=transform, **options)


def open_pilarnet(paths: list, geometry, transform, **options) -> LArTPCDataset:
    """The :data:`~pcfm.data.formats.FORMATS` opener of PILArNet files (default geometry lartpc-768)."""
    return LArTPCDataset(paths, geometry or "lartpc-768", transform=transform, **options)
