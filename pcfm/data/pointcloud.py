"""Turn detector events into PyTorch Geometric point clouds, and point clouds back into cells.

Every detector becomes the same kind of graph, so that one model runs on any geometry: points
at physical positions (mm) with the features :data:`POINT_FEATURES`, never cell indices.

Fields of a calorimeter shower (:func:`shower_to_data`, :func:`cells_to_data`, :func:`cloud_to_data`):
    ``pos``              [n, 3] float32, mm, in the geometry's local frame.
    ``x``                [n, 4] float32, :data:`POINT_FEATURES`: log(energy / 1 MeV) and the
                         cell's radial width, arc length and depth in mm.
    ``energy``           [n] float32, MeV.
    ``cell``             [n] long, the cell of each point (-1 where a point has none), for exact
                         round trips. (Not ``cell_index``: PyG's ``Batch`` would offset a key
                         containing "index" by the number of points before it.)
    ``incident_energy``  [1] float32, MeV.
    ``theta``, ``phi``   [1] float32, radians of the incident particle; NaN when unknown.
    ``particle``         [1] long PDG code; :data:`UNKNOWN_PARTICLE` (0) when unknown.
    ``y``                [1] long, ``PARTICLE_CLASSES.index(particle)`` (-1 for a particle outside
                         those classes); present only when the particle is known.
    ``geometry``         str, the geometry name ("" for a cloud given without geometry).
Fields of a LArTPC event (:func:`lartpc_to_data`): ``pos``, ``x`` (sizes = the voxel pitch),
``energy``, ``geometry``, ``semantic`` [n] long, ``particle_id`` [n] long (v2 files only) and
``y`` [1] long when given.

``torch_geometric.data.Batch.from_data_list`` batches these graphs; string fields become lists.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from pcfm import geometry as geometries
from pcfm.data.events import PARTICLE_CLASSES, CaloShowers, LArEvent
from pcfm.errors import DataError, GeometryError
from pcfm.geometry import Geometry, VoxelGridGeometry

#: Columns of ``data.x`` for every detector.
POINT_FEATURES = ("log_energy", "size_r", "size_arc", "size_z")
#: ``log_energy`` is log(max(energy, ENERGY_FLOOR_MEV)): a zero-energy LArTPC point stays finite.
ENERGY_FLOOR_MEV = 1e-6
#: ``particle`` of an event whose particle is not known (PDG code 0 is no particle).
UNKNOWN_PARTICLE = 0

GeometryLike = Union[str, Geometry]


class PointsOutsideWarning(UserWarning):
    """Emitted by :func:`data_to_showers` when points fell outside every cell and were dropped.

    Attributes:
        n_outside: points dropped per event (N,).
        energy_outside: energy dropped per event (N,), MeV.
    """

    def __init__(self, n_outside: np.ndarray, energy_outside: np.ndarray, geometry: str):
        self.n_outside = n_outside
        self.energy_outside = energy_outside
        events = np.flatnonzero(n_outside)
        super().__init__(
            f"{int(n_outside.sum())} point(s) carrying {float(energy_outside.sum()):.6g} MeV lie outside every "
            f"cell of geometry {geometry!r} and were dropped, in {events.size} event(s) (first: {events[:5].tolist()})"
        )


def point_features(energy: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """The [n, 4] feature matrix of :data:`POINT_FEATURES` from energies (MeV) and sizes (mm)."""
    log_energy = np.log(np.maximum(np.asarray(energy, dtype=np.float64), ENERGY_FLOOR_MEV))
    return torch.from_numpy(np.column_stack([log_energy, sizes]).astype(np.float32))


def _scalar(value, dtype, default) -> torch.Tensor:
    return torch.tensor([default if value is None else value], dtype=dtype)


def _event_labels(incident_energy, theta, phi, particle) -> dict:
    """The per-event fields of a calorimeter graph (see the module docstring)."""
    fields = {
        "incident_energy": _scalar(incident_energy, torch.float32, float("nan")),
        "theta": _scalar(theta, torch.float32, float("nan")),
        "phi": _scalar(phi, torch.float32, float("nan")),
        "particle": _scalar(None if particle is None else int(particle), torch.long, UNKNOWN_PARTICLE),
    }
    if particle is not None and int(particle) != UNKNOWN_PARTICLE:
        pdg = abs(int(particle))  # the class ignores the charge: e+ is an electron, pi- a pion
        fields["y"] = torch.tensor([PARTICLE_CLASSES.index(pdg) if pdg in PARTICLE_CLASSES else -1])
    return fields


def cells_to_data(cells: np.ndarray, incident_energy: float, geometry: GeometryLike, *,
                  theta: Optional[float] = None, phi: Optional[float] = None,
                  particle: Optional[int] = None, threshold: Optional[float] = None) -> Data:
    """One voxelised shower (n_cells,) as a point cloud of its cells above threshold.

    A cell becomes a point when its energy is > 0 and >= ``threshold`` (default: the geometry's
    readout threshold; the CaloChallenge evaluation zeroes the cells below it). A shower with no
    such cell gives a graph of 0 points.
    """
    geometry = geometries.get(geometry)
    cells = np.asarray(cells).reshape(-1)
    if cells.shape[0] != geometry.n_cells:
        raise DataError(f"a shower of {cells.shape[0]} cells does not fit geometry {geometry.name!r} "
                        f"of {geometry.n_cells} cells")
    if threshold is None:
        threshold = geometry.readout_threshold_mev
    index = np.flatnonzero((cells > 0) & (cells >= threshold))
    energy = cells[index].astype(np.float32)
    return Data(
        pos=torch.from_numpy(geometry.centers(index).astype(np.float32)),
        x=point_features(energy, geometry.sizes(index)),
        energy=torch.from_numpy(energy),
        cell=torch.from_numpy(index.astype(np.int64)),
        geometry=geometry.name,
        **_event_labels(incident_energy, theta, phi, particle),
    )


def shower_to_data(showers: CaloShowers, i: int, geometry: Optional[GeometryLike] = None, *,
                   threshold: Optional[float] = None) -> Data:
    """Shower ``i`` of ``showers`` as a point cloud (see :func:`cells_to_data`).

    ``geometry`` defaults to ``showers.geometry``.
    """
    geometry = geometry if geometry is not None else showers.geometry
    if geometry is None:
        raise GeometryError("the showers name no geometry: pass geometry=")
    pick = lambda values: None if values is None else values[i]  # noqa: E731
    return cells_to_data(showers.showers[i], float(showers.incident_energies[i]), geometry,
                         theta=pick(showers.theta), phi=pick(showers.phi), particle=pick(showers.particle),
                         threshold=threshold)


def cloud_to_data(points, incident_energy: float, geometry: Optional[GeometryLike] = None, *,
                  theta: Optional[float] = None, phi: Optional[float] = None, particle: Optional[int] = None,
                  path=None, event: Optional[int] = None) -> Data:
    """A shower given as points (n, 4) = x, y, z (mm), energy (MeV), e.g. a CaloClouds event.

    Rows of zero energy are padding and dropped. With ``geometry``, each point gets the cell it
    lies in (``cell``) and that cell's sizes as features; points outside every cell, and
    all points when no geometry is given, get sizes 0 and ``cell`` -1. Non-finite values
    or negative energies raise a DataError naming ``path`` and ``event`` when given.
    """
    points = np.asarray(points.cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 4:
        raise DataError(f"points must have shape (n, 4) = x, y, z, energy; got {points.shape}", path, event)
    if not np.all(np.isfinite(points)):
        raise DataError("non-finite value (NaN or inf) in the points", path, event)
    if np.any(points[:, 3] < 0):
        raise DataError(f"{int(np.sum(points[:, 3] < 0))} points have negative energy", path, event)
    points = points[points[:, 3] > 0]
    cell_index = np.full(points.shape[0], -1, dtype=np.int64)
    sizes = np.zeros((points.shape[0], 3))
    name = ""
    if geometry is not None:
        geometry = geometries.get(geometry)
        name = geometry.name
        cell_index = geometry.locate(points[:, :3])
        inside = cell_index >= 0
        sizes[inside] = geometry.sizes(cell_index[inside])
    return Data(
        pos=torch.from_numpy(points[:, :3].astype(np.float32)),
        x=point_features(points[:, 3], sizes),
        energy=torch.from_numpy(points[:, 3].astype(np.float32)),
        cell=torch.from_numpy(cell_index),
        geometry=name,
        **_event_labels(incident_energy, theta, phi, particle),
    )


def lartpc_to_data(event: LArEvent, geometry: GeometryLike = "lartpc-768", *, y: Optional[int] = None) -> Data:
    """A PILArNet-M event as a point cloud: voxel centres in mm, energy from column 3.

    Every point is kept (zero-energy points included, see :data:`ENERGY_FLOOR_MEV`), so that
    ``semantic`` and ``particle_id`` (v2) line up with the file's points. ``y`` is an optional
    event label.
    """
    geometry = geometries.get(geometry)
    if not isinstance(geometry, VoxelGridGeometry):
        raise GeometryError(f"LArTPC events need a voxel-grid geometry, {geometry.name!r} is {geometry.kind}")
    points = np.asarray(event.points)
    energy = points[:, 3].astype(np.float32)
    data = Data(
        pos=torch.from_numpy(geometry.voxel_to_mm(points[:, :3]).astype(np.float32)),
        x=point_features(energy, np.full((points.shape[0], 3), geometry.pitch_mm)),
        energy=torch.from_numpy(energy),
        semantic=torch.from_numpy(event.semantic),
        geometry=geometry.name,
    )
    if event.version >= 2:
        data.particle_id = torch.from_numpy(event.particle_id)
    if y is not None:
        data.y = torch.tensor([int(y)])
    return data


def deposit_points(pos, energy, batch, n_events: int, geometry: GeometryLike):
    """Sum point energies into the cells of ``geometry``, event by event.

    Args:
        pos: (n, 3) mm; energy: (n,) MeV; batch: (n,) event index of each point.
    Returns:
        cells (n_events, n_cells) float32 MeV, and per event the number of points outside every
        cell and their energy (both (n_events,)); those points are not deposited.
    """
    geometry = geometries.get(geometry)
    as_numpy = lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    pos, energy, batch = as_numpy(pos), as_numpy(energy).astype(np.float64), as_numpy(batch).astype(np.int64)
    index = geometry.locate(pos)
    inside = index >= 0
    flat = batch[inside] * geometry.n_cells + index[inside]
    cells = np.bincount(flat, weights=energy[inside], minlength=n_events * geometry.n_cells)
    n_outside = np.bincount(batch[~inside], minlength=n_events)
    energy_outside = np.bincount(batch[~inside], weights=energy[~inside], minlength=n_events)
    return cells.reshape(n_events, geometry.n_cells).astype(np.float32), n_outside, energy_outside


def data_to_showers(data: Union[Data, Batch, Sequence[Data]], geometry: GeometryLike, *,
                    on_outside: str = "warn") -> CaloShowers:
    """Point clouds (one graph, a list or a Batch) back to voxelised showers on ``geometry``.

    Each point's energy (``data.energy``, else ``exp(x[:, 0])``) is added to the cell holding its
    position, so generated clouds become CaloChallenge showers; a shower converted with
    :func:`shower_to_data` comes back exactly for the cells it kept. Points outside every cell
    are dropped and, by ``on_outside``: ``"warn"`` (a :class:`PointsOutsideWarning` carrying the
    counts), ``"raise"`` (a DataError naming the first such event) or ``"ignore"``.
    ``incident_energy`` is required; ``theta``, ``phi`` and ``particle`` are carried over when
    known for every event.
    """
    if on_outside not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_outside must be 'warn', 'raise' or 'ignore', got {on_outside!r}")
    geometry = geometries.get(geometry)
    if isinstance(data, Data) and not isinstance(data, Batch):
        data = Batch.from_data_list([data])
    elif not isinstance(data, Batch):
        data = Batch.from_data_list(list(data))
    if "incident_energy" not in data:
        raise DataError("the point clouds carry no incident_energy")
    energy = data.energy if "energy" in data else torch.exp(data.x[:, 0])
    n_events = data.num_graphs
    cells, n_outside, energy_outside = deposit_points(data.pos, energy, data.batch, n_events, geometry)
    if n_outside.any():
        if on_outside == "raise":
            first = int(np.flatnonzero(n_outside)[0])
            raise DataError(f"{int(n_outside[first])} point(s) lie outside every cell of geometry "
                            f"{geometry.name!r}", event=first)
        if on_outside == "warn":
            warnings.warn(PointsOutsideWarning(n_outside, energy_outside, geometry.name), stacklevel=2)

    def known(key, unknown):
        if key not in data:
            return None
        values = data[key].detach().cpu().numpy().reshape(-1)
        missing = np.isnan(values) if values.dtype.kind == "f" else values == unknown
        return None if missing.any() else values

    return CaloShowers(
        data.incident_energy.detach().cpu().numpy().reshape(-1).astype(np.float32), cells, geometry.name,
        theta=known("theta", None), phi=known("phi", None), particle=known("particle", UNKNOWN_PARTICLE),
    )
