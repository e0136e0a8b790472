"""Format detection and one entry point that turns any supported file set into point clouds.

``open_dataset("showers/*.h5")`` looks at the keys of the first file and returns the matching
lazy dataset, whose items are ``torch_geometric.data.Data`` point clouds in mm: what
``pcfm.pretrain(data=...)`` and the command line accept.
"""
from __future__ import annotations

from typing import Any, Iterable

from pcfm.data.hdf5 import PathLike, expand_paths, open_hdf5
from pcfm.errors import DataError

#: Required keys of each format, in the order they are tried.
FORMAT_KEYS = {
    "calochallenge": ("incident_energies", "showers"),
    "pilarnet": ("point", "cluster"),
    "caloclouds": ("events", "energy"),
}


def detect_format(path: PathLike) -> str:
    """The format of one HDF5 file, from its keys; a DataError naming the file if none fits."""
    with open_hdf5(path) as h5file:
        keys = set(h5file.keys())
    for name, required in FORMAT_KEYS.items():
        if keys.issuperset(required):
            return name
    expected = "; ".join(f"{name}: {', '.join(req)}" for name, req in FORMAT_KEYS.items())
    raise DataError(f"unknown file format: keys {sorted(keys)} match none of ({expected})", path)


class _CloudsAsData:
    """Picklable transform: a CaloCloudEvent to a Data point cloud (for DataLoader workers)."""

    def __init__(self, geometry, transform):
        self.geometry, self.transform = geometry, transform

    def __call__(self, event) -> Any:
        from pcfm.data.pointcloud import cloud_to_data

        data = cloud_to_data(event.points, event.incident_energy, self.geometry)
        return data if self.transform is None else self.transform(data)


def open_dataset(paths_or_globs: PathLike | Iterable[PathLike], *, format: str = "auto",
                 geometry=None, transform=None, **options):
    """A lazy dataset of point clouds over files of one format (detected from the first file).

    Args:
        paths_or_globs: files, glob patterns or folders.
        format: "auto", "calochallenge", "pilarnet" or "caloclouds".
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
    if format == "calochallenge":
        from pcfm.data.datasets import CaloChallengeDataset

        return CaloChallengeDataset(paths, geometry, transform=transform, **options)
    if format == "pilarnet":
        from pcfm.data.datasets import LArTPCDataset

        return LArTPCDataset(paths, geometry or "lartpc-768", transform=transform, **options)
    if format == "caloclouds":
        import warnings

        from pcfm.data.caloclouds import CaloCloudsDataset

        if options.get("layer_pitch_mm") is None:
            warnings.warn(f"{paths[0]}: CaloClouds files store the layer index as y; pass layer_pitch_mm= "
                          "to get y in mm (it stays in layer units otherwise)", stacklevel=2)

        return CaloCloudsDataset(paths, transform=_CloudsAsData(geometry, transform), **options)
    raise ValueError(f"unknown format {format!r}; choose auto, {', '.join(FORMAT_KEYS)}")
