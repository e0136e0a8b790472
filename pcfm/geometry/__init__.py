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


# --- the YAML schema (configs/geometries/README.md) of the built-in kinds -------------------
# Each key -> (what it must be, in words; a check of a value). A key outside these is a typo
# that would otherwise fall back silently to its default (``n_alpah: 16`` giving 1 bin).
def _number(value) -> bool:
    if isinstance(value, str):  # YAML reads 1e3 (no dot) as a string; float() takes it
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _integer(value) -> bool:
    return _number(value) and float(value) == int(float(value))


def _numbers(length=None):
    return lambda value: (isinstance(value, list) and (length is None or len(value) == length)
                          and all(_number(v) for v in value))


_text = lambda value: isinstance(value, str)  # noqa: E731
_COMMON = {"name": ("a text", _text), "kind": ("a text", _text), "description": ("a text", _text)}
_LAYER_GROUP = {
    "repeat": ("a whole number", _integer), "id": ("a whole number", _integer),
    "gap_before_mm": ("a number", _number), "absorber": ("a material name or null", lambda v: v is None or _text(v)),
    "absorber_mm": ("a number", _number), "sensor": ("a material name", _text), "sensor_mm": ("a number", _number),
    "sublayers": ("a number", _number), "n_alpha": ("a whole number", _integer),
    "r_edges_mm": ("a list of numbers", _numbers()),
    "r_bins": ("a mapping {count, width_mm}", lambda v: isinstance(v, dict)),
}
_R_BINS = {"count": ("a whole number", _integer), "width_mm": ("a number", _number)}
_SCHEMAS = {
    CylindricalGeometry: {**_COMMON, "inner_radius_mm": ("a number", _number),
                          "readout_threshold_mev": ("a number", _number), "energy_response": ("a text", _text),
                          "layers": ("a non-empty list of layer groups (mappings)",
                                     lambda v: isinstance(v, list) and len(v) > 0)},
    VoxelGridGeometry: {**_COMMON, "shape": ("a list of 3 whole numbers", lambda v: _numbers(3)(v)
                                             and all(_integer(n) for n in v)),
                        "pitch_mm": ("a number", _number), "material": ("a material name", _text),
                        "origin_mm": ("a list of 3 numbers", _numbers(3))},
}


def _check_keys(mapping: dict, schema: dict, where: str) -> None:
    for key, value in mapping.items():
        if key not in schema:
            raise GeometryError(f"{where}unknown key {key!r}; known keys: {', '.join(schema)}")
        what, ok = schema[key]
        if not ok(value):
            raise GeometryError(f"{where}{key!r} must be {what}, got {value!r}")


def _check_schema(spec: dict, cls) -> None:
    """Raise a GeometryError naming the bad key (and layer group) of a built-in kind's spec."""
    schema = _SCHEMAS.get(cls)
    if schema is None:  # a kind added by a user checks its own spec
        return
    _check_keys(spec, schema, "")
    for g, group in enumerate(spec.get("layers") or []):
        where = f"layer group {g}: "
        if not isinstance(group, dict):
            raise GeometryError(f"{where}must be a mapping of keys ({', '.join(_LAYER_GROUP)}), got {group!r}")
        _check_keys(group, _LAYER_GROUP, where)
        if isinstance(group.get("r_bins"), dict):
            _check_keys(group["r_bins"], _R_BINS, f"{where}r_bins: ")


def from_dict(spec: dict) -> Geometry:
    """Build a geometry from its dictionary (YAML) form; ``kind`` picks the class. The keys of
    the built-in kinds are checked first (unknown keys, wrong types), naming the bad key."""
    if not isinstance(spec, dict):
        raise GeometryError(f"a geometry definition must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind", "calorimeter")
    if not isinstance(kind, str) or kind not in KINDS:
        raise GeometryError(f"geometry {spec.get('name')!r}: unknown kind {kind!r}; known: {sorted(KINDS)}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise GeometryError(f"'name' must be a non-empty text, got {spec.get('name')!r}")
    try:
        _check_schema(spec, KINDS[kind])
    except GeometryError as err:
        raise GeometryError(f"geometry {spec['name']!r}: {err}") from None
    return KINDS[kind].from_dict(spec)


def load_yaml(path: Union[str, os.PathLike]) -> Geometry:
    """Read a geometry YAML file; errors name the file (and the bad key).

    The file's stem must equal the geometry's ``name`` (``configs/geometries/README.md``), so
    that the name :func:`available` lists is the one :func:`get` finds.
    """
    path = Path(path)
    try:
        with open(path) as stream:
            spec = yaml.safe_load(stream)
        geometry = from_dict(spec)
    except (yaml.YAMLError, GeometryError, TypeError, ValueError) as err:
        raise GeometryError(f"{path}: {err}") from None
    if geometry.name != path.stem:
        raise GeometryError(f"{path}: defines geometry {geometry.name!r}, but a geometry file's stem must equal "
                            f"its name: rename the file to {geometry.name}{path.suffix} or set name: {path.stem}")
    return geometry


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
