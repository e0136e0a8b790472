"""Format detection and one entry point that turns any supported file set into point clouds.

``open_dataset("showers/*.h5")`` looks at the keys of the first file and returns the matching
lazy dataset, whose items are ``torch_geometric.data.Data`` point clouds in mm: what
``pcfm.pretrain(data=...)`` and the command line accept.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable

from pcfm.data.hdf5 import PathLike, expand_paths, open_hdf5
from pcfm.errors import DataError

@dataclass(frozen=True)
class FileFormat:
    """A file format :func:`open_dataset` reads: the HDF5 keys that identify its files, and the
    function (``"module:function"``, imported on first use) that opens a list of them as a lazy
    dataset: ``opener(paths, geometry, transform, **options)``."""

    keys: tuple[str, ...]
    opener: str

    def open(self, paths: list, geometry, transform, **options):
        module_name, function = self.opener.split(":")
        return getattr(importlib.import_module(module_name), function)(paths, geometry, transform, **options)


#: Format name -> how to recognise and open it, in the order detection tries them. A new
#: format: its reader module with an opener function, and one line here.
FORMATS: dict[str, FileFormat] = {
    "calochallenge": FileFormat(("incident_energies", "showers"), "pcfm.data.datasets:open_calochallenge"),
    "pilarnet": FileFormat(("point", "cluster"), "pcfm.data.datasets:open_pilarnet"),
    "caloclouds": FileFormat(("events", "energy"), "pcfm.data.caloclouds:open_caloclouds"),
}


def detect_format(path: PathLike) -> str:
    """The format of one HDF5 file, from its keys; a DataError naming the file if none fits."""
    with open_hdf5(path) as h5file:
        keys = set(h5file.keys())
    for name, spec in FORMATS.items():
        if keys.issuperset(spec.keys):
            return name
    expected = "; ".join(f"{name}: {', '.join(spec.keys)}" for name, spec in FORMATS.items())
    raise DataError(f"unknown file format: keys {sorted(keys)} match none of ({expected})", path)


def open_dataset(paths_or_globs: PathLike | Iterable[PathLike], *, format: str = "auto",
                 geometry=None, transform=None, **options):
    """A lazy dataset of point clouds over files of one format (detected from the first file).

    Args:
        paths_or_globs: files, glob patterns or folders.
        format: "auto" or a name in :data:`FORMATS` ("calochallenge", "pilarnet", "caloclouds").
        geometry: the detector geometry (name or object); defaults per format (CaloChallenge:
            from the file attribute or voxel count; PILArNet: lartpc-768; CaloClouds: none, so
            points keep the file's coordinates and get zero cell sizes). CaloClouds files keep
            the layer index as y: give ``layer_pitch_mm`` (an option of
            :class:`~pcfm.data.caloclouds.CaloCloudsDataset`) for y in mm; a warning says so otherwise.
        transform: applied to each Data item.
        **options: passed to the format's dataset (``min_points``, ``on_error``, ...).
    """
    paths = expand_paths(paths_or_globs)
    if format == "auto":
        format = detect_format(paths[0])
    if format in FORMATS:
        return FORMATS[format].open(paths, geometry, transform, **options)
    raise ValueError(f"unknown format {format!r}; choose auto, {', '.join(FORMATS)}")
