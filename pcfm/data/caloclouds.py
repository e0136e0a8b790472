"""CaloClouds-style calorimeter showers stored as zero-padded point clouds (ILD ECAL, Geant4).

File layout:
    ``events``        (N, P, 4) float: x, y, z, E of up to P points per shower. Rows with E == 0
                      are padding (they may come before the real points, as in CaloClouds-3).
    ``energy``        (N,) or (N, 1): incident particle energy.
    ``p_norm_local``  optional (3, N) (or (N, 3) when N != 3): unit direction of the incident
                      particle in the local frame.
Energies are in GeV in the CaloClouds files (``energy_unit="GeV"``); pcfm returns MeV.

Coordinates: x and z are in mm, across the layers. y runs along the depth in units of layers:
``floor(y)`` is the layer index (0..29 in the ILD ECAL). In the real CaloClouds-3 files y is not
integer (the depth inside the layer is kept), so it is returned as stored. Give
``layer_pitch_mm`` to have y multiplied by it, i.e. a depth in mm for an assumed uniform layer
pitch (the ILD ECAL layers are not all equally thick, so this is an approximation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from pcfm.data.hdf5 import LazyEventDataset, LazyH5, open_hdf5, read_errors, require_keys
from pcfm.errors import DataError

ENERGY_UNITS_IN_MEV = {"GeV": 1000.0, "MeV": 1.0}
READ_BLOCK = 1024
#: Largest |x|, |y|, |z| a point may have (as stored: mm, y in layers unless scaled): 100 m,
#: beyond any detector in any frame. Larger values are corrupt entries (a 1e30 would overflow
#: every distance computed from it), reported as out of range.
MAX_COORDINATE = 1e5
#: Largest point and incident energy in MeV: 10 TeV, as for CaloChallenge cells.
MAX_ENERGY_MEV = 1e7


@dataclass
class CaloCloudEvent:
    """One shower as a point cloud, padding removed.

    ``points`` rows are (x mm, y, z mm, energy MeV), y in layer units (or mm when read with
    ``layer_pitch_mm``); ``incident_energy`` is in MeV.
    """

    points: np.ndarray  # (n, 4) float32
    incident_energy: float  # MeV
    direction: Optional[np.ndarray] = None  # (3,) unit vector of the incident particle, local frame
    meta: dict = field(default_factory=dict)

    @property
    def n_points(self) -> int:
        return int(self.points.shape[0])


@dataclass(frozen=True)
class _Layout:
    """How one file stores its optional direction: None, 'columns' for (3, N), 'rows' for (N, 3)."""

    direction: Optional[str]


def _energy_scale(energy_unit: str) -> float:
    if energy_unit not in ENERGY_UNITS_IN_MEV:
        raise ValueError(f"energy_unit must be one of {sorted(ENERGY_UNITS_IN_MEV)}, got {energy_unit!r}")
    return ENERGY_UNITS_IN_MEV[energy_unit]


def _inspect_file(h5file: h5py.File, path) -> _Layout:
    """Check the shapes of a CaloClouds file; find how it stores the incident direction."""
    require_keys(h5file, ("events", "energy"), path)
    events, energy = h5file["events"], h5file["energy"]
    if not isinstance(events, h5py.Dataset) or events.ndim != 3 or events.shape[2] != 4:
        raise DataError(f"'events' must have shape (N, points, 4) = x, y, z, E; found {events}", path)
    n_events = events.shape[0]
    if not isinstance(energy, h5py.Dataset) or energy.shape not in ((n_events,), (n_events, 1)):
        raise DataError(f"'energy' must have shape ({n_events},) or ({n_events}, 1); found {energy}", path)
    direction = h5file.get("p_norm_local")
    layout = None
    if isinstance(direction, h5py.Dataset):
        if direction.shape == (3, n_events):
            layout = "columns"
        elif direction.shape == (n_events, 3):
            layout = "rows"
    return _Layout(layout)


def _decode(rows: np.ndarray, incident: float, direction: Optional[np.ndarray], scale: float,
            layer_pitch_mm: Optional[float], path, index: int) -> CaloCloudEvent:
    """Validate one padded shower and return its real points in pcfm units. Values are checked
    as stored, before the cast to float32, so that a 1e39 is out of range rather than inf."""
    rows = np.asarray(rows)
    if not np.all(np.isfinite(rows)):
        raise DataError("non-finite value (NaN or inf) in 'events'", path, index)
    energy = rows[:, 3]
    if np.any(energy < 0):
        raise DataError(
            f"{int(np.sum(energy < 0))} points have negative energy (lowest {energy.min():.6g})", path, index
        )
    real = energy > 0
    if not np.any(real):
        raise DataError("event has no points: every row is zero padding", path, index)
    if not (np.isfinite(incident) and incident > 0):
        raise DataError(f"incident energy must be positive and finite, got {incident}", path, index)
    if incident * scale > MAX_ENERGY_MEV:
        raise DataError(f"incident energy {incident * scale:.6g} MeV is out of range (above {MAX_ENERGY_MEV:.0e} "
                        "MeV, 10 TeV)", path, index)
    coordinates = np.abs(rows[real, :3])
    if np.any(coordinates > MAX_COORDINATE):
        row, axis = np.unravel_index(int(np.argmax(coordinates)), coordinates.shape)
        raise DataError(f"point {int(np.flatnonzero(real)[row])} has {'xyz'[axis]} = {rows[real][row, axis]:.6g}, "
                        f"out of range (|{'xyz'[axis]}| above {MAX_COORDINATE:.0e}, 100 m)", path, index)
    if energy.max() * scale > MAX_ENERGY_MEV:
        raise DataError(f"point {int(np.argmax(energy))} has energy {energy.max() * scale:.6g} MeV, out of range "
                        f"(above {MAX_ENERGY_MEV:.0e} MeV, 10 TeV)", path, index)
    points = rows[real].astype(np.float32)
    points[:, 3] *= scale
    if layer_pitch_mm is not None:
        points[:, 1] *= layer_pitch_mm
    if direction is not None:
        direction = np.asarray(direction, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(direction)):
            raise DataError("non-finite value (NaN or inf) in 'p_norm_local'", path, index)
    return CaloCloudEvent(points, float(incident) * scale, direction,
                          meta={"path": str(path), "event": int(index)})


def _read_direction(h5file, layout: _Layout, start: int, stop: int) -> list:
    """Directions of events ``start:stop`` as (3,) arrays, or Nones when the file has none."""
    if layout.direction == "columns":
        return list(h5file["p_norm_local"][:, start:stop].T)
    if layout.direction == "rows":
        return list(h5file["p_norm_local"][start:stop])
    return [None] * (stop - start)


def _check_pitch(layer_pitch_mm: Optional[float]) -> Optional[float]:
    if layer_pitch_mm is not None and not layer_pitch_mm > 0:
        raise ValueError(f"layer_pitch_mm must be positive, got {layer_pitch_mm}")
    return None if layer_pitch_mm is None else float(layer_pitch_mm)


def read_caloclouds(path: str | os.PathLike, *, energy_unit: str = "GeV",
                    layer_pitch_mm: Optional[float] = None) -> list[CaloCloudEvent]:
    """Read and validate every shower of one CaloClouds file (energies converted to MeV).

    Bad showers (non-finite values, negative energies, no real point, bad incident energy,
    coordinates beyond :data:`MAX_COORDINATE` or energies beyond :data:`MAX_ENERGY_MEV`) raise
    a DataError naming the file and the event.
    """
    scale, pitch = _energy_scale(energy_unit), _check_pitch(layer_pitch_mm)
    showers = []
    with open_hdf5(path) as h5file, read_errors(path):
        layout = _inspect_file(h5file, path)
        n_events = h5file["events"].shape[0]
        for start in range(0, n_events, READ_BLOCK):
            stop = min(start + READ_BLOCK, n_events)
            rows = h5file["events"][start:stop]
            incident = h5file["energy"][start:stop].reshape(-1)
            directions = _read_direction(h5file, layout, start, stop)
            showers += [_decode(rows[k], incident[k], directions[k], scale, pitch, path, start + k)
                        for k in range(stop - start)]
    return showers


class CaloCloudsDataset(LazyEventDataset):
    """CaloClouds showers from one or many files, one :class:`CaloCloudEvent` per item.

    Lazy like :class:`~pcfm.data.pilarnet.PILArNetDataset`: construction reads only shapes,
    each item reads one shower through a per-process handle. ``energy_unit`` and
    ``layer_pitch_mm`` are as in :func:`read_caloclouds`; ``transform``, ``min_points`` and
    ``on_error`` as in :class:`~pcfm.data.hdf5.LazyEventDataset`. :meth:`event_sizes` counts
    the rows with positive energy.
    """

    keys = ("events", "energy")

    def __init__(self, paths_or_glob, *, energy_unit: str = "GeV", layer_pitch_mm: Optional[float] = None,
                 transform=None, min_points: int = 0, on_error: str = "raise", size_chunk: int = 4096):
        self.energy_scale = _energy_scale(energy_unit)
        self.layer_pitch_mm = _check_pitch(layer_pitch_mm)
        super().__init__(paths_or_glob, transform=transform, min_points=min_points,
                         on_error=on_error, size_chunk=size_chunk)

    def _inspect(self, h5file: h5py.File, path: Path) -> _Layout:
        return _inspect_file(h5file, path)

    def _read(self, h5: LazyH5, index: int, layout: _Layout) -> CaloCloudEvent:
        incident = float(np.asarray(h5["energy"][index]).reshape(-1)[0])
        direction = _read_direction(h5, layout, index, index + 1)[0]
        return _decode(h5["events"][index], incident, direction, self.energy_scale,
                       self.layer_pitch_mm, h5.path, index)

    def _count_points(self, h5file: h5py.File, start: int, stop: int, layout: _Layout) -> np.ndarray:
        return np.sum(h5file["events"][start:stop, :, 3] > 0, axis=1)


class _CloudsAsData:
    """Picklable transform: a CaloCloudEvent to a Data point cloud (for DataLoader workers)."""

    def __init__(self, geometry, transform):
        self.geometry, self.transform = geometry, transform

    def __call__(self, event):
        from pcfm.data.pointcloud import cloud_to_data

        data = cloud_to_data(event.points, event.incident_energy, self.geometry)
        return data if self.transform is None else self.transform(data)


def open_caloclouds(paths: list, geometry, transform, **options) -> "CaloCloudsDataset":
    """The :data:`~pcfm.data.formats.FORMATS` opener: events as ``Data`` point clouds. The files
    keep the layer index as y: without ``layer_pitch_mm`` a warning says so."""
    import warnings

    if options.get("layer_pitch_mm") is None:
        warnings.warn(f"{paths[0]}: CaloClouds files store the layer index as y; pass layer_pitch_mm= "
                      "to get y in mm (it stays in layer units otherwise)", stacklevel=4)
    return CaloCloudsDataset(paths, transform=_CloudsAsData(geometry, transform), **options)
