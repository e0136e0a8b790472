"""Detector geometries: map a cell index to its position (mm), size and material, and back.

Geometries are fetched by name with :func:`get`. The presets ship as YAML files in
``pcfm/geometry/presets/``; users add their own as YAML files in ``configs/geometries/`` of the
working directory, in a folder named by the ``PCFM_GEOMETRY_PATH`` variable (``:``-separated),
or pass a path to a YAML file. See ``configs/geometries/README.md`` for the schema.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import yaml

from pcfm.errors import GeometryError
from pcfm.geometry.base import Geometry
from pcfm.geometry.binning_xml import (Binning, LayerBinning, geometry_binning, geometry_from_binning_xml,
                                       read_binning_xml)
from pcfm.geometry.frame import UNKNOWN_FRAME, MaterialFrame, isotropic_frame
from pcfm.geometry.cylindrical import CaloLayer, CylindricalGeometry, SamplingStructure
from pcfm.geometry.materials import MATERIALS, Material, get_material
from pcfm.geometry.voxel_grid import VoxelGridGeometry

__all__ = [
    "Geometry", "CylindricalGeometry", "VoxelGridGeometry", "CaloLayer", "SamplingStructure",
    "Material", "MATERIALS", "get_material", "Binning", "LayerBinning", "read_binning_xml",
    "geometry_binning", "geometry_from_binning_xml", "get", "available", "register", "from_dict",
    "load_yaml", "save_yaml", "KINDS", "MaterialFrame", "isotropic_frame", "UNKNOWN_FRAME",
]

PRESET_DIR = Path(__file__).parent / "presets"
#: Geometry kind (the YAML "kind") -> its class: a new kind is a Geometry subclass and one line here.
KINDS = {"calorimeter": CylindricalGeometry, "cylindrical": CylindricalGeometry, "voxel_grid": VoxelGridGeometry}
_registered: dict[str, Geometry] = {}
_cache: dict[tuple, Geometry] = {}


def from_dict(spec: dict) -> Geometry:
    """Build a geometry from its dictionary (YAML) form; ``kind`` picks the class."""
    if not isinstance(spec, dict):
        raise GeometryError(f"a geometry definition must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind", "calorimeter")
    if kind not in KINDS:
        raise GeometryError(f"geometry {spec.get('name')!r}: unknown kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind].from_dict(spec)


def load_yaml(path: Union[str, os.PathLike]) -> Geometry:
    """Read a geometry YAML file; errors name the file."""
    path = Path(path)
    try:
        with open(path) as stream:
            spec = yaml.safe_load(stream)
        return from_dict(spec)
    except (yaml.YAMLError, GeometryError, TypeError, ValueError) as err:
        raise GeometryError(f"{path}: {err}") from None


def save_yaml(geometry: Geometry, path: Union[str, os.PathLike]) -> None:
    """Write a geometry as YAML (atomically)."""
    from pcfm.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as stream:
        yaml.safe_dump(geometry.to_dict(), stream, sort_keys=False)


def _search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("PCFM_GEOMETRY_PATH", "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "configs" / "geometries", PRESET_DIR]


def available() -> list[str]:
    """Names of every geometry :func:`get` can find (registered, user YAML files, presets)."""
    names = set(_registered)
    for folder in _search_dirs():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def register(geometry: Geometry, overwrite: bool = False) -> Geometry:
    """Make an in-memory geometry available to :func:`get` under its name."""
    if geometry.name in _registered and not overwrite:
        raise GeometryError(f"a geometry named {geometry.name!r} is already registered")
    _registered[geometry.name] = geometry
    return geometry


def get(name: Union[str, os.PathLike, Geometry]) -> Geometry:
    """A geometry by name, by path to a YAML file, or passed through if already a Geometry.

    Presets: calochallenge-ds1-photons, calochallenge-ds1-pions, calochallenge-ds2,
    calochallenge-ds3, par04-scipb, lartpc-768.
    """
    if isinstance(name, Geometry):
        return name
    if str(name) in _registered:
        return _registered[str(name)]
    by_path = str(name).endswith((".yaml", ".yml"))
    candidates = [Path(name)] if by_path else [d / f"{name}.yaml" for d in _search_dirs()]
    for path in candidates:
        if path.is_file():
            key = (path.resolve(), path.stat().st_mtime_ns)
            if key not in _cache:
                geometry = load_yaml(path)
                if not by_path and geometry.name != str(name):
                    raise GeometryError(f"{path}: defines geometry {geometry.name!r}, expected {str(name)!r}")
                _cache[key] = geometry
            return _cache[key]
    raise GeometryError(f"unknown geometry {str(name)!r}; available: {', '.join(available())}")
