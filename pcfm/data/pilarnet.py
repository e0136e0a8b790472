"""PILArNet-M LArTPC events: read and write its HDF5 files, and a lazy torch dataset over them.

Layout (one entry per event in each dataset, every entry a flat variable-length array):
    ``point``          reshapes to (n, 8): x, y, z (voxels of the 768^3 box), energy (MeV),
                       second energy column, time, number of electrons, dx.
    ``cluster``        reshapes to (m, 5) in v1, (m, 6) in v2: size, fragment id, group id,
                       interaction id, semantic class, (v2) particle id.
    ``cluster_extra``  v2 only, reshapes to (m, 5): mass, momentum, vertex x, y, z.
A file is v2 when it has ``cluster_extra``. Points are stored cluster after cluster, so the
per-point labels are ``np.repeat(cluster column, cluster sizes)`` (see :class:`LArEvent`).

The reader accepts float or integer entries in ``cluster``; ids are returned as int64 and must be
integer-valued. The writer stores ``point`` and ``cluster_extra`` as float32 and ``cluster`` as
int64 variable-length arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from pcfm.io import atomic_path
from pcfm.data.events import SEMANTIC_CLASSES, LArEvent
from pcfm.data.hdf5 import LazyEventDataset, LazyH5, open_hdf5, read_errors, require_keys
from pcfm.errors import DataError

POINT_COLUMNS = 8
POINT_COLUMN_NAMES = ("x", "y", "z", "energy", "energy_2", "time", "n_electrons", "dx")
CLUSTER_COLUMNS = {1: 5, 2: 6}
EXTRA_COLUMNS = 5
ENERGY_COLUMN = 3
SEMANTIC_COLUMN = 4
#: Voxels along x, y, z of the PILArNet-M box: coordinates must lie in [0, n) on each axis.
BOX_VOXELS = (768, 768, 768)
#: Largest deposited energy (MeV) of one point: 10 TeV (as for calorimeter cells; a real LArTPC
#: voxel holds at most hundreds of MeV); above it a value is a corrupt entry.
MAX_POINT_ENERGY_MEV = 1e7
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _inspect_file(h5file: h5py.File, path) -> int:
    """Check the datasets of a PILArNet-M file and return its layout version (1 or 2)."""
    require_keys(h5file, ("point", "cluster"), path)
    keys = [k for k in ("point", "cluster", "cluster_extra") if k in h5file]
    for key in keys:
        node = h5file[key]
        if not isinstance(node, h5py.Dataset) or node.ndim != 1 or h5py.check_vlen_dtype(node.dtype) is None:
            found = f"shape {node.shape}, dtype {node.dtype}" if isinstance(node, h5py.Dataset) else "a group"
            raise DataError(f"{key!r} must be a 1-D dataset of variable-length arrays, found {found}", path)
    lengths = {k: h5file[k].shape[0] for k in keys}
    if len(set(lengths.values())) != 1:
        raise DataError(f"datasets disagree on the number of events: {lengths}", path)
    return 2 if "cluster_extra" in h5file else 1


def _reshape(flat: np.ndarray, columns: int, key: str, path, index) -> np.ndarray:
    flat = np.asarray(flat).reshape(-1)
    if flat.size % columns:
        raise DataError(f"{key!r} holds {flat.size} values, not a multiple of {columns}", path, index)
    return flat.reshape(-1, columns)


def _as_ids(clusters: np.ndarray, path, index) -> np.ndarray:
    """Cluster table as int64, refusing non-integer values (ids and sizes are counts)."""
    if np.issubdtype(clusters.dtype, np.integer):
        return clusters.astype(np.int64, copy=False)
    if not np.all(np.isfinite(clusters)) or np.any(clusters != np.round(clusters)):
        raise DataError("'cluster' holds non-integer values", path, index)
    return clusters.astype(np.int64)


def check_event(event: LArEvent, path=None, index=None, box_voxels=BOX_VOXELS) -> None:
    """Raise a DataError naming ``path`` and ``index`` unless ``event`` is a valid PILArNet-M event.

    Adds to :meth:`LArEvent.validate` (shapes, empty events, non-finite values, cluster sizes
    summing to the point count): no negative cluster size, no negative deposited energy,
    semantic classes in 0..4, and range checks: x, y, z inside the box of ``box_voxels`` voxels
    ([0, n) on each axis, :data:`BOX_VOXELS` by default), energies up to
    :data:`MAX_POINT_ENERGY_MEV`, and every value within float32 (the files' type), so that a
    corrupt entry is named here rather than met as an overflow in training.
    """
    clusters = np.asarray(event.clusters)
    if clusters.ndim == 2 and clusters.shape[1] in CLUSTER_COLUMNS.values() and np.any(clusters[:, 0] < 0):
        k = int(np.argmax(clusters[:, 0] < 0))
        raise DataError(f"cluster {k} has a negative size ({int(clusters[k, 0])} points)", path, index)
    event.validate(path, index)
    points = event.points
    xyz = points[:, :3]
    outside = np.any((xyz < 0) | (xyz >= np.asarray(box_voxels, dtype=np.float64)), axis=1)
    if np.any(outside):
        k = int(np.argmax(outside))
        box = "x".join(str(int(n)) for n in box_voxels)
        raise DataError(f"{int(outside.sum())} points lie outside the {box} voxel box (first: point {k} at "
                        f"voxel ({', '.join(f'{v:.6g}' for v in xyz[k])}))", path, index)
    energy = points[:, ENERGY_COLUMN]
    if np.any(energy < 0):
        raise DataError(
            f"{int(np.sum(energy < 0))} points have negative energy (lowest {energy.min():.6g} MeV)",
            path, index,
        )
    if np.any(energy > MAX_POINT_ENERGY_MEV):
        raise DataError(f"point {int(np.argmax(energy))} has energy {energy.max():.6g} MeV, out of range "
                        f"(above {MAX_POINT_ENERGY_MEV:.0e} MeV, 10 TeV)", path, index)
    for key, values, names in (("point", points, POINT_COLUMN_NAMES), ("cluster_extra", event.cluster_extra, None)):
        if values is not None and np.any(np.abs(values) > _FLOAT32_MAX):
            row, column = np.unravel_index(int(np.argmax(np.abs(values))), values.shape)
            name = names[column] if names else f"column {column}"
            raise DataError(f"{key!r} value {values[row, column]:.6g} ({name} of row {row}) is out of range: "
                            "it overflows float32", path, index)
    semantic = event.clusters[:, SEMANTIC_COLUMN]
    bad = (semantic < 0) | (semantic >= len(SEMANTIC_CLASSES))
    if np.any(bad):
        raise DataError(
            f"semantic class {semantic[bad][0]} outside 0..{len(SEMANTIC_CLASSES) - 1}", path, index
        )


def _decode(point, cluster, extra, version: int, path, index: int, box_voxels=BOX_VOXELS) -> LArEvent:
    """Build and validate one event from the flat arrays stored in the file; values are checked
    as stored, then cast to float32 (so that a 1e39 is out of range, not inf)."""
    points = _reshape(point, POINT_COLUMNS, "point", path, index)
    clusters = _as_ids(_reshape(cluster, CLUSTER_COLUMNS[version], "cluster", path, index), path, index)
    cluster_extra = None
    if extra is not None:
        cluster_extra = _reshape(extra, EXTRA_COLUMNS, "cluster_extra", path, index)
    event = LArEvent(points, clusters, cluster_extra, meta={"path": str(path), "event": int(index)})
    check_event(event, path, index, box_voxels)
    event.points = points.astype(np.float32, copy=False)
    if cluster_extra is not None:
        event.cluster_extra = cluster_extra.astype(np.float32, copy=False)
    return event


def read_pilarnet_event(path: str | os.PathLike, index: int, *, box_voxels=BOX_VOXELS) -> LArEvent:
    """Read and validate event ``index`` (negative counts from the end) of a PILArNet-M file
    (:func:`check_event`; ``box_voxels`` bounds the coordinates)."""
    with open_hdf5(path) as h5file, read_errors(path, index):
        version = _inspect_file(h5file, path)
        n_events = h5file["point"].shape[0]
        if not -n_events <= index < n_events:
            raise IndexError(f"{path}: event {index} out of range, the file holds {n_events} events")
        index = int(index) % n_events
        extra = h5file["cluster_extra"][index] if version == 2 else None
        return _decode(h5file["point"][index], h5file["cluster"][index], extra, version, path, index, box_voxels)


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of flat arrays, the form h5py writes to variable-length datasets."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out


def _append(h5file: h5py.File, events: list[LArEvent], version: int, block: int) -> None:
    """Append ``events`` to the (created on first use) variable-length datasets of ``h5file``."""
    layout = {"point": np.float32, "cluster": np.int64}
    if version == 2:
        layout["cluster_extra"] = np.float32
    for key, dtype in layout.items():
        if key not in h5file:
            h5file.create_dataset(key, shape=(0,), maxshape=(None,), chunks=(block,),
                                  dtype=h5py.vlen_dtype(dtype))
    if not events:
        return
    columns = {
        "point": [e.points for e in events],
        "cluster": [e.clusters for e in events],
        "cluster_extra": [e.cluster_extra for e in events],
    }
    for key, dtype in layout.items():
        dataset = h5file[key]
        start = dataset.shape[0]
        dataset.resize((start + len(events),))
        # write_direct, because slice assignment turns equal-length entries into a 2-D array
        values = _object_array([np.asarray(a, dtype=dtype).reshape(-1) for a in columns[key]])
        dataset.write_direct(values, dest_sel=np.s_[start:start + len(events)])


def write_pilarnet(path: str | os.PathLike, events: Iterable[LArEvent], version: int | None = None,
                   *, block: int = 1024) -> int:
    """Write ``events`` to a PILArNet-M file and return how many were written.

    The layout version is taken from the events (``version`` only asserts it); all events must
    share one. Every event is validated first (:func:`check_event`). Events are written in blocks
    of ``block``, so a generator of any length works. The file appears only when everything is
    written: on any error no file (and no temporary file) is left and an existing file of that
    name is untouched.
    """
    if version not in (None, 1, 2):
        raise ValueError(f"version must be 1, 2 or None, got {version!r}")
    n_written = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5file:
        pending: list[LArEvent] = []
        for i, event in enumerate(events):
            check_event(event, path, i)
            _as_ids(np.asarray(event.clusters), path, i)
            if version is None:
                version = event.version
            if event.version != version:
                raise DataError(
                    f"event is PILArNet-M v{event.version} but the file is v{version}; "
                    "all events of a file must share one version", path, i,
                )
            if version == 2 and event.cluster_extra is None:
                raise DataError("a v2 event needs cluster_extra", path, i)
            pending.append(event)
            if len(pending) == block:
                _append(h5file, pending, version, block)
                n_written += len(pending)
                pending = []
        _append(h5file, pending, version or 1, block)
        n_written += len(pending)
    return n_written


def _cluster_point_counts(entries: np.ndarray, columns: int) -> np.ndarray:
    """Points per event as the sum of its cluster sizes; 0 for a malformed ``cluster`` entry."""
    sizes = np.zeros(len(entries), dtype=np.int64)
    lengths = np.fromiter((e.size for e in entries), dtype=np.int64, count=len(entries))
    ok = lengths % columns == 0
    if not np.any(lengths[ok]):
        return sizes
    table = np.concatenate(list(entries[ok])).reshape(-1, columns)
    n_clusters = lengths[ok] // columns
    owner = np.repeat(np.arange(n_clusters.size), n_clusters)
    total = np.bincount(owner, weights=table[:, 0].astype(np.float64), minlength=n_clusters.size)
    sizes[ok] = np.where(np.isfinite(total) & (total > 0), total, 0).astype(np.int64)
    return sizes


class PILArNetDataset(LazyEventDataset):
    """PILArNet-M events from one or many files (a path, a glob, a folder or a list of them).

    ``dataset[i]`` is a validated :class:`LArEvent` (``meta`` holds its file and index there), or
    ``transform(event)``. Files are opened lazily in each process and only the requested event is
    read; ``len`` comes from the dataset shapes. Files of both layout versions may be mixed.

    Args:
        paths_or_glob: files, glob patterns or folders; expanded by :func:`expand_paths`.
        transform: applied to each event after validation.
        min_points: drop events with fewer points. Needs :meth:`event_sizes`, so it reads the
            ``cluster`` datasets of all files at construction (about 1/50 of the data).
        on_error: ``"raise"`` or ``"skip"``; see :class:`~pcfm.data.hdf5.LazyEventDataset`
            (``"skip"`` returns the next good event in place of a bad one; :meth:`scan`
            validates everything and drops bad events up front).

    :meth:`event_sizes` counts points as the sum of the cluster sizes, read from ``cluster``
    only, in chunks of ``size_chunk`` events. ``box_voxels`` bounds the voxel coordinates
    (:func:`check_event`; :class:`~pcfm.data.datasets.LArTPCDataset` passes its geometry's shape).
    """

    keys = ("point", "cluster")

    def __init__(self, paths_or_glob, *, box_voxels=BOX_VOXELS, **options):
        self.box_voxels = tuple(int(n) for n in box_voxels)
        super().__init__(paths_or_glob, **options)

    def _inspect(self, h5file: h5py.File, path: Path) -> int:
        return _inspect_file(h5file, path)

    def _read(self, h5: LazyH5, index: int, version: int) -> LArEvent:
        extra = h5["cluster_extra"][index] if version == 2 else None
        return _decode(h5["point"][index], h5["cluster"][index], extra, version, h5.path, index, self.box_voxels)

    def _count_points(self, h5file: h5py.File, start: int, stop: int, version: int) -> np.ndarray:
        return _cluster_point_counts(h5file["cluster"][start:stop], CLUSTER_COLUMNS[version])

    @property
    def versions(self) -> list[int]:
        """Layout version of each file, in the order of :attr:`paths`."""
        return list(self.file_info)
