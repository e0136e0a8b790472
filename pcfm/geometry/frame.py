"""The detector frame in material units: where a point is in the detector, in X0 and Moliere radii.

Showers of the same particle look alike in every calorimeter once lengths are measured in the
material's own units: depth in radiation lengths X0, transverse distance in Moliere radii R_M.
The SiW calorimeter of CaloChallenge dataset 2 (X0 4.2 mm, R_M 10.9 mm) and the Pb /
scintillator ``par04-scipb`` (X0 18 mm, R_M 37 mm) have the same mesh in these units (0.8 X0
layers, 0.43 R_M radial bins), so a backbone that reads material units sees the same showers on
both. That is what makes cross-geometry transfer possible, so every geometry kind provides a
:class:`MaterialFrame` (``geometry.material_frame``).

A frame maps a position ``(x, y, z)`` in mm in the geometry's local frame to

    ``(x - x0) / t(z),  (y - y0) / t(z),  d(z)``

with ``(x0, y0, z0)`` the frame's origin, ``d`` a piecewise-linear depth in material units
through the layers (knots at layer boundaries; a gap without material adds no depth) and ``t``
the transverse unit of the layer at that depth (piecewise constant). Beyond the first and last
knot both are extrapolated from the end segments, so noisy positions (diffusion) map too.

- Calorimeters (:class:`~pcfm.geometry.CylindricalGeometry`): origin at the front face on the
  mesh axis (the nominal particle direction), ``d`` = depth in X0 from the front face, ``t`` =
  the layer's effective Moliere radius. Absolute: the depth at which a shower starts (what
  separates electrons from photons) and its distance from the axis are physics; the frame is
  rotation-symmetric about the axis only in the radius ``hypot(x, y)``.
- Voxel grids (LArTPC): origin at the centre of the volume, every axis in radiation lengths of
  the medium (140 mm in liquid argon); a position in the frame is a position in the TPC
  volume. The physics of a LArTPC is translation invariant away from the walls: the backbone
  reads positions relative to each other for its local features and this absolute position
  only as one more input (containment near the walls).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class MaterialFrame:
    """A geometry's map from mm to its detector frame in material units (module docstring).

    Attributes:
        origin_mm: (3,) point of the local frame (mm) that maps to the frame's origin.
        knots_mm: (K,) increasing depths ``z - z0`` (mm) at which the depth map bends, K >= 2.
        depth_at_knots: (K,) material depth (X0) at each knot, non-decreasing.
        transverse_mm: (K - 1,) transverse unit (mm, the Moliere radius) of each segment.
        depth_unit: name of the depth unit, for documentation ("X0").
        transverse_unit: name of the transverse unit ("R_M", or "X0" for an isotropic medium).
    """

    origin_mm: tuple
    knots_mm: tuple
    depth_at_knots: tuple
    transverse_mm: tuple
    depth_unit: str = "X0"
    transverse_unit: str = "R_M"

    def __post_init__(self):
        knots, depth, transverse = (np.asarray(v, dtype=np.float64) for v in
                                    (self.knots_mm, self.depth_at_knots, self.transverse_mm))
        if len(self.origin_mm) != 3 or knots.ndim != 1 or knots.size < 2:
            raise ValueError("a material frame needs a 3-vector origin and at least two knots")
        if np.any(np.diff(knots) <= 0) or depth.shape != knots.shape or np.any(np.diff(depth) < 0):
            raise ValueError("knots must increase and the depth at them must not decrease")
        if transverse.shape != (knots.size - 1,) or np.any(transverse <= 0) or not np.all(np.isfinite(transverse)):
            raise ValueError("need one positive transverse unit per segment between knots")

    @cached_property
    def _arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """float64 tensors of origin, knots, depths, transverse units (CPU; moved per call)."""
        return tuple(torch.tensor(np.asarray(v, dtype=np.float64)) for v in
                     (self.origin_mm, self.knots_mm, self.depth_at_knots, self.transverse_mm))

    def _segments(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per position: depth (units), depth units per mm (the local slope), transverse mm."""
        _, knots, depth, transverse = (a.to(z.device) for a in self._arrays)
        segment = (torch.searchsorted(knots, z.double().contiguous(), right=True) - 1).clamp(0, knots.numel() - 2)
        slope = (depth[segment + 1] - depth[segment]) / (knots[segment + 1] - knots[segment])
        return depth[segment] + (z.double() - knots[segment]) * slope, slope, transverse[segment]

    def to_units(self, pos_mm: Tensor) -> Tensor:
        """Positions (N, 3) mm in the local frame -> (N, 3) frame coordinates in material units."""
        origin = self._arrays[0].to(pos_mm.device)
        relative = pos_mm.double() - origin
        depth, _, transverse = self._segments(relative[:, 2])
        out = torch.stack([relative[:, 0] / transverse, relative[:, 1] / transverse, depth], 1)
        return out.to(pos_mm.dtype if pos_mm.is_floating_point() else torch.float32)

    def sizes_to_units(self, pos_mm: Tensor, sizes_mm: Tensor) -> Tensor:
        """Cell sizes (N, 3) mm (radial or x, arc or y, depth) of cells at ``pos_mm`` in material units."""
        origin = self._arrays[0].to(pos_mm.device)
        _, slope, transverse = self._segments(pos_mm[:, 2].double() - origin[2])
        sizes = sizes_mm.double()
        out = torch.stack([sizes[:, 0] / transverse, sizes[:, 1] / transverse, sizes[:, 2] * slope], 1)
        return out.to(sizes_mm.dtype)

    def depth_and_radius(self, pos_mm: Tensor) -> Tensor:
        """(N, 4): depth (mm from the origin along z), distance from the frame's z axis (mm), and
        both in material units: the frame coordinates a user reads (calorimeters: depth from the
        front face and distance from the particle axis, in mm, X0 and R_M)."""
        origin = self._arrays[0].to(pos_mm.device)
        relative = pos_mm.double() - origin
        units = self.to_units(pos_mm).double()
        return torch.stack([relative[:, 2], torch.hypot(relative[:, 0], relative[:, 1]), units[:, 2],
                            torch.hypot(units[:, 0], units[:, 1])], 1).to(units.dtype)


def isotropic_frame(origin_mm, unit_mm: float, unit: str = "X0") -> MaterialFrame:
    """A frame of one length unit along every axis (a homogeneous medium such as liquid argon)."""
    return MaterialFrame(origin_mm=tuple(float(v) for v in origin_mm), knots_mm=(0.0, float(unit_mm)),
                         depth_at_knots=(0.0, 1.0), transverse_mm=(float(unit_mm),), depth_unit=unit,
                         transverse_unit=unit)


#: The frame of a point cloud that names no geometry: centimetres about the local origin (about
#: a radiation length of a dense absorber; nothing about the detector is known).
UNKNOWN_FRAME = isotropic_frame((0.0, 0.0, 0.0), 10.0, unit="cm")
