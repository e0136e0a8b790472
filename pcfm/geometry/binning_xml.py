"""Reader for the CaloChallenge 2022 binning XML files.

Each ``<Layer id=.. r_edges="0,4.65,.." n_bin_alpha=".."/>`` gives one readout layer's radial
edges (mm) and number of angular bins; a layer whose edges are just "0" has no cells (ATLAS
layers absent from the barrel) and is left out. The files carry no depths or materials, so a
geometry is built from them together with a sampling structure, or compared to a preset.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from os import PathLike
from typing import Callable, Optional, Union

from pcfm.errors import DataError, GeometryError
from pcfm.geometry.cylindrical import CaloLayer, CylindricalGeometry, SamplingStructure


@dataclass(frozen=True)
class LayerBinning:
    id: int
    r_edges_mm: tuple
    n_alpha: int

    @property
    def n_cells(self) -> int:
        return (len(self.r_edges_mm) - 1) * self.n_alpha


@dataclass(frozen=True)
class Binning:
    """The content of one binning file: the particle it was made for and its active layers."""

    particle_pdg: Optional[int]
    particle_name: str
    layers: tuple

    @property
    def n_cells(self) -> int:
        return sum(layer.n_cells for layer in self.layers)


def read_binning_xml(path: Union[str, PathLike]) -> Binning:
    """Parse a CaloChallenge binning XML file; errors name the file and the layer at fault."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise
    except (ET.ParseError, OSError) as err:
        raise DataError(f"not a readable binning XML file ({err})", path) from None
    bin_node = root.find("Bin") if root.tag != "Bin" else root
    if bin_node is None:
        raise DataError("no <Bin> element", path)
    pid = bin_node.get("pid")
    layers = []
    for node in bin_node.findall("Layer"):
        try:
            layer_id = int(node.get("id"))
            edges = tuple(float(e) for e in node.get("r_edges").split(","))
            n_alpha = int(node.get("n_bin_alpha", "1"))
        except (TypeError, ValueError, AttributeError):
            raise DataError(f"malformed <Layer> element {ET.tostring(node, encoding='unicode').strip()}", path) from None
        if len(edges) < 2:
            continue  # a layer with no radial bins has no cells
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise DataError(f"layer {layer_id}: radial edges do not increase: {edges}", path)
        layers.append(LayerBinning(layer_id, edges, n_alpha))
    if not layers:
        raise DataError("no layer with cells", path)
    return Binning(int(pid) if pid is not None else None, bin_node.get("name", ""), tuple(layers))


def geometry_binning(geometry: CylindricalGeometry) -> Binning:
    """The binning of a geometry, in the form :func:`read_binning_xml` returns, for comparison."""
    layers = tuple(LayerBinning(l.id, tuple(float(e) for e in l.r_edges_mm), l.n_alpha) for l in geometry.layers)
    return Binning(None, geometry.name, layers)


def geometry_from_binning_xml(
    path: Union[str, PathLike], name: str,
    structure: Union[SamplingStructure, Callable[[int], SamplingStructure]], **kwargs,
) -> CylindricalGeometry:
    """A geometry with the binning of ``path`` and layers stacked front to back without gaps.

    ``structure`` is one sampling structure for every layer or a function of the layer id;
    other keyword arguments go to :class:`CylindricalGeometry`.
    """
    binning = read_binning_xml(path)
    layers, z = [], 0.0
    for lb in binning.layers:
        s = structure(lb.id) if callable(structure) else structure
        if not isinstance(s, SamplingStructure):
            raise GeometryError(f"no sampling structure for layer {lb.id}")
        layers.append(CaloLayer(lb.id, lb.r_edges_mm, lb.n_alpha, z, s))
        z += s.depth_mm
    return CylindricalGeometry(name, layers, **kwargs)
