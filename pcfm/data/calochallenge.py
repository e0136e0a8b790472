"""CaloChallenge 2022 files: read, validate and write voxelised calorimeter showers.

Layout (HDF5, gzip):
    ``incident_energies``  float (N, 1), MeV.
    ``showers``            float (N, n_voxels), MeV per voxel, flattened (layer, angular bin,
                           radial bin) with the radial index fastest.
Optional datasets pcfm writes and reads when present: ``theta`` and ``phi`` (radians) and
``particle`` (PDG code), each (N,) or (N, 1); and a file attribute ``geometry`` with the name of
the geometry (see :func:`pcfm.geometry.get`).

The geometry of a file is, in order: the ``geometry`` argument, the file's ``geometry``
attribute, or the preset whose cell count matches the voxel count (:data:`GEOMETRY_BY_VOXELS`).
6480 voxels is the mesh of both ``calochallenge-ds2`` and ``par04-scipb``; without an argument
or attribute such a file is read as ``calochallenge-ds2``, the official data set.

Files are read and validated in chunks of events (a 40500-voxel file of 50k showers is 8 GB),
and :class:`CaloChallengeFile` reads single events or slices lazily, one handle per process.
Energies come back as float32 whatever the file stores.

Why one module of this length: the format's reader, its validation (checked on the stored values
before the cast, so that the first bad event is named) and its writer share the layout and the
chunking; each is read beside the others when the format changes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import h5py
import numpy as np

from pcfm import geometry as geometries
from pcfm.io import atomic_path
from pcfm.data.events import CaloShowers
from pcfm.data.hdf5 import LazyH5, open_hdf5, read_errors, require_keys
from pcfm.errors import DataError, GeometryError
from pcfm.geometry import Geometry

PathLike = Union[str, os.PathLike]
REQUIRED_KEYS = ("incident_energies", "showers")
EXTRA_KEYS = ("theta", "phi", "particle")

#: Preset geometry assumed for a file of this many voxels when nothing else says which.
GEOMETRY_BY_VOXELS = {
    368: "calochallenge-ds1-photons",
    533: "calochallenge-ds1-pions",
    6480: "calochallenge-ds2",  # par04-scipb shares this mesh: name it explicitly to read it so
    40500: "calochallenge-ds3",
}

#: Largest energy (MeV) of a cell or an incident particle that a reader accepts: 10 TeV, ten
#: times the highest CaloChallenge energy (1 TeV). Larger values are corrupt entries (a 1e30 MeV
#: cell would dominate every sum and standardisation downstream), reported as out of range.
MAX_ENERGY_MEV = 1e7

#: Values per block read or validated at once (16 Mi floats, 64 MB in float32).
BLOCK_VALUES = 1 << 24
#: Bytes per HDF5 chunk the writer aims at: small enough that reading one event stays cheap.
CHUNK_BYTES = 1 << 20


class SkippedEventsWarning(UserWarning):
    """Emitted by :func:`read_calochallenge` with ``on_error="skip"`` when bad events were dropped.

    Attributes:
        path: the file.
        errors: one :class:`DataError` per skipped event (its ``event`` is the index in the file).
    """

    def __init__(self, path: PathLike, errors: list[DataError]):
        self.path = str(path)
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:3]) + ("; ..." if len(errors) > 3 else "")
        super().__init__(f"{path}: skipped {len(errors)} bad event(s): {shown}")


def infer_geometry(n_voxels: int, path: Optional[PathLike] = None) -> str:
    """The preset name for a file of ``n_voxels`` voxels (see :data:`GEOMETRY_BY_VOXELS`)."""
    if n_voxels not in GEOMETRY_BY_VOXELS:
        known = ", ".join(f"{n} ({name})" for n, name in GEOMETRY_BY_VOXELS.items())
        raise DataError(f"no preset geometry has {n_voxels} voxels (known: {known}); "
                        "pass geometry= to read this file", path)
    return GEOMETRY_BY_VOXELS[n_voxels]


def _resolve_geometry(geometry, n_voxels: int, attribute: Optional[str], path) -> Geometry:
    """Pick the geometry of a file and check that its cell count matches the voxel count."""
    if geometry is None and attribute is not None:
        try:
            geometry = geometries.get(attribute)
        except GeometryError as err:
            raise DataError(f"the file names geometry {attribute!r}, which pcfm cannot find ({err}); "
                            "pass geometry= to read it", path) from None
    if geometry is None:
        geometry = infer_geometry(n_voxels, path)
    geometry = geometries.get(geometry)
    if geometry.n_cells != n_voxels:
        raise DataError(f"'showers' has {n_voxels} voxels per event but geometry {geometry.name!r} "
                        f"has {geometry.n_cells} cells", path)
    return geometry


def block_events_for(n_voxels: int) -> int:
    """Events per block of about :data:`BLOCK_VALUES` values."""
    return max(1, BLOCK_VALUES // max(n_voxels, 1))


# --- validation ---------------------------------------------------------------------------------
def find_bad_events(incident: np.ndarray, showers: np.ndarray, extras: Optional[dict] = None,
                    first_event: int = 0) -> list[tuple[int, str]]:
    """(event index, problem) for every bad event of a block; vectorised over the block.

    Problems: incident energy not positive and finite, or above :data:`MAX_ENERGY_MEV`; NaN or
    inf in the shower; a cell above :data:`MAX_ENERGY_MEV` (out of range: this also catches
    finite values that float32 cannot hold, such as 1e39); a negative cell; an empty shower
    (every cell zero); non-finite angles; a non-integer particle code. An event with several
    problems is listed once, with the first. ``first_event`` is the index of the block's first
    event in its file. Give the values as stored (before any cast to float32), so that a value
    too large for float32 is reported as out of range rather than as inf.
    """
    incident = np.asarray(incident).reshape(-1)
    low, high = showers.min(axis=1), showers.max(axis=1)  # NaN propagates through min/max
    # (mask of bad events, message for bad event k), in the order problems are reported
    checks = [
        (~(np.isfinite(incident) & (incident > 0)),
         lambda k: f"incident energy must be positive and finite, got {incident[k]:.6g} MeV"),
        (incident > MAX_ENERGY_MEV,
         lambda k: f"incident energy {incident[k]:.6g} MeV is out of range (above {MAX_ENERGY_MEV:.0e} MeV, "
                   "10 TeV)"),
        (~(np.isfinite(low) & np.isfinite(high)),
         lambda k: "non-finite cell energy (NaN or inf) in 'showers'"),
        (high > MAX_ENERGY_MEV,
         lambda k: f"cell energy {high[k]:.6g} MeV in cell {int(np.argmax(showers[k]))} is out of range "
                   f"(above {MAX_ENERGY_MEV:.0e} MeV, 10 TeV)"),
        (low < 0,
         lambda k: f"negative cell energy {low[k]:.6g} MeV in cell {int(np.argmin(showers[k]))}"),
        ((low == 0) & (high == 0),
         lambda k: f"empty shower: all {showers.shape[1]} cells are zero"),
    ]
    for name, values in (extras or {}).items():
        values = np.asarray(values).reshape(-1)
        if name == "particle":
            is_integer = np.isfinite(values) & (values == np.round(values)) if values.dtype.kind == "f" else True
            checks.append((~np.broadcast_to(is_integer, values.shape),
                           lambda k, v=values: f"particle code {v[k]} is not an integer PDG code"))
        else:
            checks.append((~np.isfinite(values), lambda k, v=values, n=name: f"non-finite {n} {v[k]}"))
            checks.append((np.abs(values) > 2 * np.pi,
                           lambda k, v=values, n=name: f"{n} {v[k]:.6g} is out of range (radians, |{n}| <= 2 pi)"))
    bad = np.logical_or.reduce([mask for mask, _ in checks])
    problems = []
    for k in np.flatnonzero(bad):
        message = next(describe(k) for mask, describe in checks if mask[k])
        problems.append((first_event + int(k), message))
    return problems


# --- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileLayout:
    """What one file holds: event and voxel counts, its geometry, the optional datasets present."""

    n_events: int
    n_voxels: int
    geometry: Geometry
    extras: tuple


def inspect_file(h5file: h5py.File, path, geometry) -> FileLayout:
    """Check the shapes of an open CaloChallenge file and find its geometry; raise DataError if bad."""
    require_keys(h5file, REQUIRED_KEYS, path)
    showers, incident = h5file["showers"], h5file["incident_energies"]
    for key, node in (("showers", showers), ("incident_energies", incident)):
        if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "fiu":
            raise DataError(f"{key!r} must be a numeric dataset, found {node}", path)
    if showers.ndim != 2:
        raise DataError(f"'showers' must have shape (N, n_voxels), found {showers.shape}", path)
    n_events, n_voxels = showers.shape
    if incident.ndim not in (1, 2) or (incident.ndim == 2 and incident.shape[1] != 1):
        raise DataError(f"'incident_energies' must have shape (N, 1), found {incident.shape}", path)
    if incident.shape[0] != n_events:
        raise DataError(f"'incident_energies' holds {incident.shape[0]} events but 'showers' holds "
                        f"{n_events}", path)
    extras = []
    for key in EXTRA_KEYS:
        if key in h5file:
            node = h5file[key]
            if not isinstance(node, h5py.Dataset) or node.shape not in ((n_events,), (n_events, 1)):
                raise DataError(f"optional dataset {key!r} must have shape ({n_events},) or ({n_events}, 1), "
                                f"found {node}", path)
            extras.append(key)
    attribute = h5file.attrs.get("geometry")
    if isinstance(attribute, bytes):
        attribute = attribute.decode()
    return FileLayout(n_events, n_voxels, _resolve_geometry(geometry, n_voxels, attribute, path), tuple(extras))


def read_block(h5, layout: FileLayout, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Incident energies, showers and extras of events ``start:stop``, as stored (float64 stays
    float64, so that :func:`find_bad_events` sees a 1e39 before float32 turns it into inf)."""
    incident = np.asarray(h5["incident_energies"][start:stop]).reshape(-1)
    showers = np.asarray(h5["showers"][start:stop])
    extras = {key: np.asarray(h5[key][start:stop]).reshape(-1) for key in layout.extras}
    return incident, showers, extras


def file_geometry(path: PathLike) -> tuple[Optional[str], Optional[str]]:
    """(the geometry a CaloChallenge file names in its ``geometry`` attribute, the preset its
    voxel count implies (:data:`GEOMETRY_BY_VOXELS`)), each None when there is none; reads only
    the file's metadata."""
    with open_hdf5(path) as h5file, read_errors(path):
        attribute = h5file.attrs.get("geometry")
        showers = h5file.get("showers")
        n_voxels = showers.shape[1] if isinstance(showers, h5py.Dataset) and showers.ndim == 2 else None
    if isinstance(attribute, bytes):
        attribute = attribute.decode()
    return (None if attribute is None else str(attribute)), GEOMETRY_BY_VOXELS.get(n_voxels)


def _as_showers(incident, showers, extras: dict, geometry: Geometry) -> CaloShowers:
    particle = extras.get("particle")
    return CaloShowers(
        incident, showers, geometry.name,
        theta=None if "theta" not in extras else extras["theta"].astype(np.float32),
        phi=None if "phi" not in extras else extras["phi"].astype(np.float32),
        particle=None if particle is None else particle.astype(np.int64),
    )


def read_calochallenge(path: PathLike, geometry=None, *, start: int = 0, stop: Optional[int] = None,
                       on_error: str = "raise", block_events: Optional[int] = None) -> CaloShowers:
    """Read events ``start:stop`` of a CaloChallenge file into memory, validating every event.

    Args:
        path: the HDF5 file.
        geometry: name or object; default from the file attribute or the voxel count (module doc).
        start, stop: event range, as in Python slicing (negative values count from the end).
        on_error: ``"raise"``: the first bad event raises a :class:`DataError` naming the file,
            the event index in the file and the problem. ``"skip"``: bad events are left out and
            one :class:`SkippedEventsWarning` lists them (``warning.errors``). Problems with the
            whole file (missing datasets, wrong voxel count, event counts that disagree) always
            raise.
        block_events: events read and validated at once (default: about 64 MB of float32).

    Returns:
        CaloShowers with float32 energies, ``geometry`` set to the geometry's name.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    with open_hdf5(path) as h5file, read_errors(path):
        layout = inspect_file(h5file, path, geometry)
        first, last, _ = slice(start, stop).indices(layout.n_events)
        last = max(first, last)
        block = block_events or block_events_for(layout.n_voxels)
        incident_out = np.empty(last - first, dtype=np.float32)
        showers_out = np.empty((last - first, layout.n_voxels), dtype=np.float32)
        extras_out = {key: [] for key in layout.extras}
        skipped: list[DataError] = []
        kept = 0
        for a in range(first, last, block):
            b = min(a + block, last)
            with read_errors(path, a if b - a == 1 else None):
                incident, showers, extras = read_block(h5file, layout, a, b)
            problems = find_bad_events(incident, showers, extras, first_event=a)
            good = np.ones(b - a, dtype=bool)
            for event, problem in problems:
                if on_error == "raise":
                    raise DataError(problem, path, event)
                skipped.append(DataError(problem, path, event))
                good[event - a] = False
            n_good = int(good.sum())
            incident_out[kept:kept + n_good] = incident[good]
            showers_out[kept:kept + n_good] = showers[good]
            for key in layout.extras:
                extras_out[key].append(extras[key][good])
            kept += n_good
    if skipped:
        warnings.warn(SkippedEventsWarning(path, skipped), stacklevel=2)
    extras = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in extras_out.items()}
    return _as_showers(incident_out[:kept], showers_out[:kept], extras, layout.geometry)


class CaloChallengeFile:
    """Lazy access to one CaloChallenge file: single events or slices, without loading the file.

    The HDF5 handle is opened on first use in each process (:class:`~pcfm.data.hdf5.LazyH5`), so
    an instance can be shared with DataLoader workers. Every read is validated; a bad event
    raises a :class:`DataError` naming the file and the event.

    ``len(f)`` is the number of events; ``f[i]`` and ``f[a:b]`` return :class:`CaloShowers`
    (one event for an integer index).
    """

    def __init__(self, path: PathLike, geometry=None):
        self.path = Path(path)
        with open_hdf5(self.path) as h5file, read_errors(self.path):
            self.layout = inspect_file(h5file, self.path, geometry)
        self._h5 = LazyH5(self.path)

    @property
    def geometry(self) -> Geometry:
        return self.layout.geometry

    @property
    def n_voxels(self) -> int:
        return self.layout.n_voxels

    def __len__(self) -> int:
        return self.layout.n_events

    def read(self, start: int = 0, stop: Optional[int] = None) -> CaloShowers:
        """Events ``start:stop`` (Python slice rules), validated."""
        first, last, _ = slice(start, stop).indices(len(self))
        last = max(first, last)
        incident, showers, extras = read_valid_block(self._h5, self.layout, self.path, first, last)
        return _as_showers(incident, showers, extras, self.geometry)

    def __getitem__(self, index) -> CaloShowers:
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise ValueError("CaloChallengeFile slices must be contiguous (step 1)")
            return self.read(index.start or 0, index.stop)
        n = len(self)
        if not -n <= int(index) < n:
            raise IndexError(f"{self.path}: event {index} out of range, the file holds {n} events")
        index = int(index) % n
        return self.read(index, index + 1)

    def iter_blocks(self, block_events: Optional[int] = None) -> Iterator[CaloShowers]:
        """The whole file as consecutive validated blocks of ``block_events`` events."""
        block = block_events or block_events_for(self.n_voxels)
        for a in range(0, len(self), block):
            yield self.read(a, a + block)

    def count_cells(self, threshold: float = 0.0, block_events: Optional[int] = None) -> np.ndarray:
        """Cells per event with energy > 0 and >= ``threshold``, counted block by block (N,)."""
        with read_errors(self.path):
            return count_cells_in_blocks(self._h5["showers"], 0, len(self), threshold,
                                         block_events or block_events_for(self.n_voxels))

    def close(self) -> None:
        self._h5.close()

    def __repr__(self) -> str:
        return f"CaloChallengeFile({str(self.path)!r}, {len(self)} events, geometry={self.geometry.name!r})"


def count_cells(showers: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Cells per row with energy > 0 and >= ``threshold``: the points each shower becomes."""
    return np.count_nonzero((showers > 0) & (showers >= threshold), axis=1)


def count_cells_in_blocks(showers, start: int, stop: int, threshold: float, block: int) -> np.ndarray:
    """:func:`count_cells` of rows ``start:stop`` of an array or HDF5 dataset, read ``block``
    rows at a time so that a large file is never loaded whole."""
    return np.concatenate([count_cells(showers[a:min(a + block, stop)], threshold)
                           for a in range(start, stop, block)] or [np.zeros(0, np.int64)])


def read_valid_block(h5, layout: FileLayout, path, first: int, last: int):
    """Events ``first:last`` as (incident, showers, extras); the first bad event raises a
    DataError naming it. A read failure names the event when only one is read."""
    with read_errors(path, first if last - first == 1 else None):
        incident, showers, extras = read_block(h5, layout, first, last)
    problems = find_bad_events(incident, showers, extras, first_event=first)
    if problems:
        raise DataError(problems[0][1], path, problems[0][0])
    return incident.astype(np.float32, copy=False), showers.astype(np.float32, copy=False), extras


# --- writing ------------------------------------------------------------------------------------
def write_calochallenge(path: PathLike, showers: CaloShowers, geometry=None, *,
                        compression: Optional[str] = "gzip", chunk_events: Optional[int] = None) -> None:
    """Write ``showers`` as a CaloChallenge file (the official layout, atomically).

    ``incident_energies`` (N, 1) float64 and ``showers`` (N, n_voxels) float32 as in the
    official files (the official classifier fails on float32 incident energies: "mat1 and mat2
    must have the same dtype"; float32 values widen to float64 exactly); ``theta``,
    ``phi`` (float32) and ``particle`` (int64), each (N, 1), when set; the file attribute
    ``geometry`` names the geometry (``geometry`` argument, else ``showers.geometry``, else the
    preset matching the voxel count). Every event is validated first (the checks of
    :func:`read_calochallenge`): a bad event raises a DataError naming ``path`` and the event,
    and nothing is written. The file appears only once complete; an existing file of the same
    name survives any failure. ``chunk_events`` sets the HDF5 chunk (default: about 1 MB).
    """
    n_events, n_voxels = showers.showers.shape
    if n_events == 0:
        raise DataError("no showers to write", path)
    geometry = _resolve_geometry(geometry if geometry is not None else showers.geometry, n_voxels, None, path)
    incident = np.asarray(showers.incident_energies).reshape(-1, 1)
    extras = {key: getattr(showers, key) for key in EXTRA_KEYS if getattr(showers, key) is not None}
    block = block_events_for(n_voxels)
    for a in range(0, n_events, block):  # checked as given: a 1e39 is out of range, not inf
        cells = np.asarray(showers.showers[a:a + block])
        problems = find_bad_events(incident[a:a + block], cells,
                                   {k: v[a:a + block] for k, v in extras.items()}, first_event=a)
        if problems:
            raise DataError(problems[0][1], path, problems[0][0])
    chunk = chunk_events or max(1, CHUNK_BYTES // (4 * n_voxels))
    chunk = min(chunk, n_events)
    options = {"compression": compression} if compression else {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5file:
        h5file.attrs["geometry"] = geometry.name
        h5file.create_dataset("incident_energies", data=incident.astype(np.float64), chunks=(chunk, 1), **options)
        dataset = h5file.create_dataset("showers", shape=(n_events, n_voxels), dtype=np.float32,
                                        chunks=(chunk, n_voxels), **options)
        for a in range(0, n_events, block):
            dataset[a:a + block] = np.asarray(showers.showers[a:a + block], dtype=np.float32)
        for key, values in extras.items():
            dtype = np.int64 if key == "particle" else np.float32
            h5file.create_dataset(key, data=np.asarray(values, dtype=dtype).reshape(-1, 1),
                                  chunks=(chunk, 1), **options)
