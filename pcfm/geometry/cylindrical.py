"""Cylindrical calorimeter meshes: layers along the particle direction, each cut into angular
and radial bins (the CaloChallenge / Par04 readout).

Local frame: z runs along the nominal particle direction from the calorimeter's front face,
x and y are transverse, the mesh axis is the z axis. Cell (layer, alpha bin j, radial bin k)
covers z in [z_front, z_front + depth), alpha in [-pi + j * 2pi / n_alpha, -pi + (j + 1) * 2pi / n_alpha)
and r in [r_edges[k], r_edges[k + 1]). Flat cell order is (layer, alpha, r), r fastest, as in
CaloChallenge files. A cell's point is the middle of its r, alpha and z ranges; a cell that
spans the whole circle (n_alpha = 1) therefore sits at alpha = 0, not at the axis, so that its
annuli stay distinct points.

Why one module of this length: the mesh (cells <-> mm), its materials (X0, Moliere radius,
sampling fraction), its frame and its symmetries all belong to the one geometry class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, reduce
from typing import Optional, Sequence

import numpy as np

from pcfm.errors import GeometryError
from pcfm.geometry.base import Geometry
from pcfm.geometry.frame import MaterialFrame
from pcfm.geometry.materials import SCALE_ENERGY_MEV, Material, get_material


@dataclass(frozen=True)
class SamplingStructure:
    """What one readout layer is made of: ``sublayers`` periods of absorber then sensor.

    A homogeneous layer has no absorber (``absorber=None``, ``absorber_mm=0``). ``sublayers``
    may be fractional where a real detector is approximated (an accordion, say).
    """

    sensor: Material
    sensor_mm: float
    absorber: Optional[Material] = None
    absorber_mm: float = 0.0
    sublayers: float = 1.0

    def __post_init__(self):
        if self.sensor_mm <= 0 or self.absorber_mm < 0 or self.sublayers <= 0:
            raise GeometryError(f"invalid sampling structure {self}")
        if (self.absorber is None) != (self.absorber_mm == 0):
            raise GeometryError("an absorber needs a positive thickness, and a thickness needs an absorber")

    @property
    def depth_mm(self) -> float:
        return self.sublayers * (self.absorber_mm + self.sensor_mm)

    def _parts(self):
        period = self.absorber_mm + self.sensor_mm
        parts = [(self.sensor, self.sensor_mm / period)]
        if self.absorber is not None:
            parts.append((self.absorber, self.absorber_mm / period))
        return parts

    @property
    def x0_mm(self) -> float:
        """Effective radiation length of the mixture (thickness-weighted 1/X0)."""
        return 1.0 / sum(f / m.x0_mm for m, f in self._parts())

    @property
    def interaction_length_mm(self) -> float:
        return 1.0 / sum(f / m.interaction_length_mm for m, f in self._parts())

    @property
    def moliere_radius_mm(self) -> float:
        """Effective Moliere radius: 1/R_M = (1/E_s) sum_j f_j E_c,j / X0,j."""
        return SCALE_ENERGY_MEV / sum(f * m.critical_energy_mev / m.x0_mm for m, f in self._parts())

    @property
    def critical_energy_mev(self) -> float:
        return self.x0_mm * sum(f * m.critical_energy_mev / m.x0_mm for m, f in self._parts())

    @property
    def mip_sampling_fraction(self) -> float:
        """Share of a minimum-ionising particle's energy loss that lands in the sensor."""
        visible = self.sensor_mm * self.sensor.mip_dedx_mev_per_mm
        hidden = self.absorber_mm * self.absorber.mip_dedx_mev_per_mm if self.absorber else 0.0
        return visible / (visible + hidden)

    def to_dict(self) -> dict:
        spec = {"sensor": self.sensor.name, "sensor_mm": self.sensor_mm, "sublayers": self.sublayers}
        if self.absorber is not None:
            spec.update(absorber=self.absorber.name, absorber_mm=self.absorber_mm)
        return spec


@dataclass(frozen=True)
class CaloLayer:
    """One readout layer: its id (as in CaloChallenge binning files), binning and depth."""

    id: int
    r_edges_mm: tuple
    n_alpha: int
    z_front_mm: float
    structure: SamplingStructure

    def __post_init__(self):
        edges = np.asarray(self.r_edges_mm, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0) or edges[0] < 0:
            raise GeometryError(f"layer {self.id}: r edges must increase from >= 0, got {self.r_edges_mm}")
        if self.n_alpha < 1:
            raise GeometryError(f"layer {self.id}: n_alpha must be >= 1, got {self.n_alpha}")

    @property
    def n_r(self) -> int:
        return len(self.r_edges_mm) - 1

    @property
    def n_cells(self) -> int:
        return self.n_r * self.n_alpha

    @property
    def depth_mm(self) -> float:
        return self.structure.depth_mm

    @property
    def z_back_mm(self) -> float:
        return self.z_front_mm + self.depth_mm


class CylindricalGeometry(Geometry):
    """A calorimeter read out on a cylindrical (r, alpha, z) mesh; see the module docstring.

    Args:
        name: the name :func:`pcfm.geometry.get` knows it by.
        layers: the readout layers, front to back.
        inner_radius_mm: distance of the front face from the beam axis (metadata for users and
            for the incident-angle convention; the local frame starts at the front face).
        readout_threshold_mev: cells below this energy (in the units stored in files) read zero.
        energy_response: how stored cell energies relate to deposited energy: "calibrated"
            (sensor energy divided by the sampling fraction, so that a shower sums to about its
            incident energy) or "visible" (energy in the sensors only).
    """

    kind = "calorimeter"

    def __init__(self, name: str, layers: Sequence[CaloLayer], *, inner_radius_mm: float = 0.0,
                 readout_threshold_mev: float = 0.0, energy_response: str = "calibrated",
                 description: str = ""):
        super().__init__(name, description)
        self.layers = tuple(layers)
        if not self.layers:
            raise GeometryError(f"geometry {name!r} has no layers")
        ids = [layer.id for layer in self.layers]
        if len(set(ids)) != len(ids):
            raise GeometryError(f"geometry {name!r}: duplicate layer ids {ids}")
        for before, after in zip(self.layers, self.layers[1:]):
            if after.z_front_mm < before.z_back_mm - 1e-9:
                raise GeometryError(f"geometry {name!r}: layer {after.id} overlaps layer {before.id}")
        if energy_response not in ("calibrated", "visible"):
            raise GeometryError(f"energy_response must be 'calibrated' or 'visible', got {energy_response!r}")
        self.inner_radius_mm = float(inner_radius_mm)
        self.readout_threshold_mev = float(readout_threshold_mev)
        self.energy_response = energy_response

    # -- sizes and index bookkeeping ------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_cells(self) -> int:
        return int(self.layer_offsets[-1])

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """First flat index of each layer, plus the total at the end (n_layers + 1,)."""
        return np.concatenate([[0], np.cumsum([layer.n_cells for layer in self.layers])]).astype(np.int64)

    @property
    def layer_ids(self) -> list[int]:
        return [layer.id for layer in self.layers]

    @property
    def is_regular(self) -> bool:
        """True when every layer has the same radial edges and angular bins."""
        first = self.layers[0]
        return all(l.n_alpha == first.n_alpha and np.allclose(l.r_edges_mm, first.r_edges_mm) for l in self.layers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layers, n_alpha, n_r) of a regular mesh; showers reshape to (N, *shape)."""
        if not self.is_regular:
            raise GeometryError(f"geometry {self.name!r} is irregular: its layers have different binnings")
        return (self.n_layers, self.layers[0].n_alpha, self.layers[0].n_r)

    @cached_property
    def _cell_bins(self) -> np.ndarray:
        """(n_cells, 3) layer position, alpha bin and radial bin of every cell."""
        parts = []
        for i, layer in enumerate(self.layers):
            a, r = np.meshgrid(np.arange(layer.n_alpha), np.arange(layer.n_r), indexing="ij")
            parts.append(np.stack([np.full(a.size, i), a.ravel(), r.ravel()], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def cell_bins(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """(layer position, alpha bin, radial bin) of cells; layer position counts from 0 in ``layers``."""
        return self._cell_bins[self._check_index(index)]

    def cell_index(self, layer: np.ndarray, alpha_bin: np.ndarray, r_bin: np.ndarray) -> np.ndarray:
        """Flat index of (layer position, alpha bin, radial bin); raises IndexError out of range."""
        layer, alpha_bin, r_bin = (np.asarray(v, dtype=np.int64) for v in (layer, alpha_bin, r_bin))
        n_alpha, n_r = self._per_layer("n_alpha"), self._per_layer("n_r")
        if np.any((layer < 0) | (layer >= self.n_layers)):
            raise IndexError(f"layer out of range [0, {self.n_layers})")
        if np.any((alpha_bin < 0) | (alpha_bin >= n_alpha[layer]) | (r_bin < 0) | (r_bin >= n_r[layer])):
            raise IndexError("alpha or radial bin out of range for its layer")
        return self.layer_offsets[layer] + alpha_bin * n_r[layer] + r_bin

    def _per_layer(self, attribute: str) -> np.ndarray:
        return np.array([getattr(layer, attribute) for layer in self.layers])

    # -- positions -------------------------------------------------------------------------
    @cached_property
    def _cell_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(r, alpha, z) centre and (radial width, arc, depth) size of every cell, computed once."""
        bins = self._cell_bins
        out = np.empty((self.n_cells, 3))
        sizes = np.empty((self.n_cells, 3))
        for i, layer in enumerate(self.layers):
            sel = bins[:, 0] == i
            edges = np.asarray(layer.r_edges_mm, dtype=np.float64)
            r_bin, a_bin = bins[sel, 2], bins[sel, 1]
            width = 2 * np.pi / layer.n_alpha
            r_mid = 0.5 * (edges[r_bin] + edges[r_bin + 1])
            out[sel, 0] = r_mid
            out[sel, 1] = -np.pi + (a_bin + 0.5) * width if layer.n_alpha > 1 else 0.0
            out[sel, 2] = layer.z_front_mm + 0.5 * layer.depth_mm
            sizes[sel, 0] = edges[r_bin + 1] - edges[r_bin]
            sizes[sel, 1] = r_mid * width
            sizes[sel, 2] = layer.depth_mm
        return out, sizes

    def cylindrical(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """Cell centres (n, 3) as (r mm, alpha rad, z mm)."""
        return self._cell_table[0][self._check_index(index)]

    def centers(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        r, alpha, z = self.cylindrical(index).T
        return np.stack([r * np.cos(alpha), r * np.sin(alpha), z], axis=1)

    def sizes(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """Cell extents (n, 3): radial width, arc length at the cell's middle radius, depth (mm)."""
        return self._cell_table[1][self._check_index(index)]

    @cached_property
    def _locate_tables(self):
        # One sorted array of all radial edges, shifted by layer so that a single searchsorted
        # finds the radial bin of every point whatever its layer.
        shift = 1e7  # mm, far beyond any radius
        keys = np.concatenate([i * shift + np.asarray(l.r_edges_mm) for i, l in enumerate(self.layers)])
        first_edge = np.concatenate([[0], np.cumsum([l.n_r + 1 for l in self.layers])[:-1]])
        z_edges = np.array([l.z_front_mm for l in self.layers] + [self.layers[-1].z_back_mm])
        return shift, keys, first_edge, z_edges

    @cached_property
    def _uniform_mesh(self):
        """(depth, r width, n_r, n_alpha) when layers and radial bins are evenly spaced, else None."""
        if not self.is_regular:
            return None
        edges = np.asarray(self.layers[0].r_edges_mm)
        fronts = np.array([l.z_front_mm for l in self.layers])
        depth = self.layers[0].depth_mm
        if edges[0] != 0 or not np.allclose(np.diff(edges), edges[1]) or not np.allclose(fronts, depth * np.arange(self.n_layers)):
            return None
        return depth, edges[1], self.layers[0].n_r, self.layers[0].n_alpha

    def locate(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        x, y, z = positions.T
        if self._uniform_mesh is not None:  # arithmetic instead of searches: the simulators' hot path
            depth, width, n_r, n_alpha = self._uniform_mesh
            layer = np.floor(z / depth).astype(np.int64)
            r_bin = np.floor(np.hypot(x, y) / width).astype(np.int64)
            a_bin = np.minimum(np.floor((np.arctan2(y, x) + np.pi) * (n_alpha / (2 * np.pi))).astype(np.int64), n_alpha - 1)
            inside = (layer >= 0) & (layer < self.n_layers) & (r_bin < n_r)
            return np.where(inside, (layer * n_alpha + a_bin) * n_r + r_bin, -1)
        shift, keys, first_edge, z_edges = self._locate_tables
        layer = np.searchsorted(z_edges, z, side="right") - 1
        in_z = (layer >= 0) & (layer < self.n_layers)
        layer_c = np.clip(layer, 0, self.n_layers - 1)
        # gaps between layers belong to no cell
        in_z &= z < np.array([l.z_back_mm for l in self.layers])[layer_c]
        r = np.hypot(x, y)
        pos = np.searchsorted(keys, layer_c * shift + r, side="right") - 1
        r_bin = pos - first_edge[layer_c]
        n_r, n_alpha = self._per_layer("n_r"), self._per_layer("n_alpha")
        inside = in_z & (r_bin >= 0) & (r_bin < n_r[layer_c])
        alpha = np.arctan2(y, x)
        a_bin = np.floor((alpha + np.pi) / (2 * np.pi) * n_alpha[layer_c]).astype(np.int64)
        a_bin = np.clip(a_bin, 0, n_alpha[layer_c] - 1)  # alpha = +pi exactly
        out = np.full(positions.shape[0], -1, dtype=np.int64)
        out[inside] = self.layer_offsets[layer_c[inside]] + a_bin[inside] * n_r[layer_c[inside]] + r_bin[inside]
        return out

    # -- per-layer views and physics ---------------------------------------------------------
    def split_layers(self, showers: np.ndarray) -> list[np.ndarray]:
        """Showers (N, n_cells) as one array (N, n_alpha, n_r) per layer."""
        showers = np.asarray(showers)
        return [
            showers[:, self.layer_offsets[i]:self.layer_offsets[i + 1]].reshape(-1, l.n_alpha, l.n_r)
            for i, l in enumerate(self.layers)
        ]

    def layer_x0(self) -> np.ndarray:
        """Depth of each layer boundary in radiation lengths from the front face (n_layers + 1,).

        Gaps between layers are counted as empty (no material).
        """
        return np.concatenate([[0], np.cumsum([l.depth_mm / l.structure.x0_mm for l in self.layers])])

    def layer_lambda(self) -> np.ndarray:
        """Like :meth:`layer_x0` in nuclear interaction lengths."""
        return np.concatenate([[0], np.cumsum([l.depth_mm / l.structure.interaction_length_mm for l in self.layers])])

    @property
    def depth_mm(self) -> float:
        return self.layers[-1].z_back_mm

    @cached_property
    def material_frame(self) -> MaterialFrame:
        """Depth in X0 from the front face through the layers (gaps add none), transverse
        distance from the mesh axis in each layer's Moliere radius (:mod:`pcfm.geometry.frame`)."""
        knots, depth, transverse = [self.layers[0].z_front_mm], [0.0], []
        for layer in self.layers:
            if layer.z_front_mm > knots[-1] + 1e-9:  # a gap: no material, the next layer's R_M
                knots.append(layer.z_front_mm)
                depth.append(depth[-1])
                transverse.append(layer.structure.moliere_radius_mm)
            knots.append(layer.z_back_mm)
            depth.append(depth[-1] + layer.depth_mm / layer.structure.x0_mm)
            transverse.append(layer.structure.moliere_radius_mm)
        return MaterialFrame(origin_mm=(0.0, 0.0, 0.0), knots_mm=tuple(knots), depth_at_knots=tuple(depth),
                             transverse_mm=tuple(transverse))

    # -- serialisation -----------------------------------------------------------------------
    # ------------------------------------------------------------------ behaviour (see Geometry)
    def rotation_step(self) -> Optional[float]:
        """The smallest rotation (radians) about the mesh axis that maps every layer's angular bins
        onto themselves, or None when only the identity does (a layer of one angular bin)."""
        common = reduce(math.gcd, (layer.n_alpha for layer in self.layers))
        return None if common < 2 else 2 * math.pi / common

    def move_by_symmetry(self, pos, phi, events, point_event, generator=None) -> bool:
        """Rotations about the mesh axis by whole angular bins (:meth:`rotation_step`) and the
        reflection y -> -y; ``phi`` turns with the event (a known ``theta`` is unchanged)."""
        import torch

        n = events.numel()
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        step = self.rotation_step()
        angle = torch.zeros(n) if step is None else torch.randint(
            0, round(2 * math.pi / step), (n,), generator=generator).double() * step
        flip, angle = flip.to(pos.device), angle.to(pos.device)
        x, y = pos[:, 0].double(), pos[:, 1].double() * flip[point_event]
        cos, sin = angle.cos()[point_event], angle.sin()[point_event]
        pos[:, 0], pos[:, 1] = (x * cos - y * sin).to(pos.dtype), (x * sin + y * cos).to(pos.dtype)
        if phi is not None:
            known = torch.isfinite(phi[events])
            turned = torch.remainder(phi[events].double() * flip + angle + math.pi, 2 * math.pi) - math.pi
            phi[events] = torch.where(known, turned.to(phi.dtype), phi[events])
        return True

    def spread_within_cells(self, pos, jitter):
        """:func:`spread_in_cylinder`: radius, azimuth and depth move within the cell."""
        return spread_in_cylinder(pos, jitter)

    def extent_text(self) -> str:
        return f"{self.depth_mm:7.1f} mm {self.layer_x0()[-1]:5.1f} X0"

    def simulate_events(self, n_events, rng, *, particles, energy_range, theta_range, target_points=None):
        """Showers of :func:`pcfm.sim.simulate_showers`, each of a particle drawn from
        ``particles`` (``target_points`` does not apply)."""
        from pcfm.data import ShowerDataset
        from pcfm.sim import simulate_showers

        pdg = np.asarray(particles)[rng.integers(len(particles), size=n_events)]
        theta = tuple(float(t) for t in theta_range) if isinstance(theta_range, (tuple, list)) else theta_range
        showers = simulate_showers(self, n_events, particle=pdg, energy=tuple(energy_range),
                                   theta=theta, rng=rng)
        return ShowerDataset(showers)

    def to_dict(self) -> dict:
        layers, z = [], 0.0
        for layer in self.layers:
            spec = {"id": layer.id, "r_edges_mm": [float(e) for e in layer.r_edges_mm], "n_alpha": layer.n_alpha}
            spec.update(layer.structure.to_dict())
            if layer.z_front_mm - z > 1e-9:
                spec["gap_before_mm"] = layer.z_front_mm - z
            z = layer.z_back_mm
            layers.append(spec)
        return {
            "name": self.name, "kind": self.kind, "description": self.description,
            "inner_radius_mm": self.inner_radius_mm, "readout_threshold_mev": self.readout_threshold_mev,
            "energy_response": self.energy_response, "layers": layers,
        }

    @classmethod
    def from_dict(cls, spec: dict) -> "CylindricalGeometry":
        """Build from the YAML schema (see ``configs/geometries/README.md``).

        ``layers`` is a list of groups; a group with ``repeat: N`` stands for N identical layers
        with consecutive ids. Radial bins are given as ``r_edges_mm`` or as
        ``r_bins: {count: N, width_mm: W}``.
        """
        name = spec.get("name")
        if not name:
            raise GeometryError("a geometry needs a 'name'")
        groups = spec.get("layers")
        if not groups:
            raise GeometryError(f"geometry {name!r}: 'layers' is missing or empty")
        layers, z, next_id = [], 0.0, 0
        for g, group in enumerate(groups):
            try:
                edges = _radial_edges(group)
                structure = SamplingStructure(
                    sensor=get_material(group["sensor"]), sensor_mm=float(group["sensor_mm"]),
                    absorber=get_material(group["absorber"]) if group.get("absorber") else None,
                    absorber_mm=float(group.get("absorber_mm", 0.0)),
                    sublayers=float(group.get("sublayers", 1)),
                )
                n_alpha = int(group.get("n_alpha", 1))
            except KeyError as missing:
                raise GeometryError(f"geometry {name!r}: layer group {g} lacks {missing}") from None
            layer_id = int(group.get("id", next_id))
            z += float(group.get("gap_before_mm", 0.0))
            for _ in range(int(group.get("repeat", 1))):
                layers.append(CaloLayer(layer_id, tuple(edges), n_alpha, z, structure))
                z += structure.depth_mm
                layer_id += 1
            next_id = layer_id
        return cls(
            name, layers, inner_radius_mm=spec.get("inner_radius_mm", 0.0),
            readout_threshold_mev=spec.get("readout_threshold_mev", 0.0),
            energy_response=spec.get("energy_response", "calibrated"),
            description=spec.get("description", ""),
        )


def _radial_edges(group: dict) -> list[float]:
    if "r_edges_mm" in group:
        return [float(e) for e in group["r_edges_mm"]]
    bins = group["r_bins"]
    return [float(i) * float(bins["width_mm"]) for i in range(int(bins["count"]) + 1)]


def spread_in_cylinder(pos, jitter):
    """Points ``pos`` (n, 3) mm moved within cylindrical-mesh cells: radius by the radial jitter,
    azimuth by the arc jitter / radius, depth by the depth jitter (torch tensors)."""
    import torch

    radius = torch.hypot(pos[:, 0], pos[:, 1])
    angle = torch.atan2(pos[:, 1], pos[:, 0]) + jitter[:, 1] / radius.clamp(min=1e-6) * (radius > 0)
    radius = radius + jitter[:, 0]
    return torch.stack([radius * angle.cos(), radius * angle.sin(), pos[:, 2] + jitter[:, 2]], 1)
