"""A regular box of cubic voxels: the LArTPC readout of PILArNet-M (768^3 voxels of 3 mm)."""
from __future__ import annotations

from functools import cached_property
from typing import Optional, Sequence

import numpy as np

from pcfm.errors import GeometryError
from pcfm.geometry.base import Geometry
from pcfm.geometry.frame import MaterialFrame, isotropic_frame
from pcfm.geometry.materials import Material, get_material


class VoxelGridGeometry(Geometry):
    """``shape`` voxels of ``pitch_mm`` along x, y, z, the first voxel's corner at ``origin_mm``.

    Voxel coordinates (the x, y, z columns of PILArNet-M files) count voxels from the corner;
    voxel ``i`` spans [origin + i * pitch, origin + (i + 1) * pitch).
    """

    kind = "voxel_grid"

    def __init__(self, name: str, shape: Sequence[int] = (768, 768, 768), pitch_mm: float = 3.0,
                 material: str | Material = "LAr", origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
                 description: str = ""):
        super().__init__(name, description)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"geometry {name!r}: shape must be three positive integers, got {shape}")
        if pitch_mm <= 0:
            raise GeometryError(f"geometry {name!r}: pitch_mm must be positive, got {pitch_mm}")
        self.pitch_mm = float(pitch_mm)
        self.material = get_material(material)
        self.origin_mm = np.asarray(origin_mm, dtype=np.float64).reshape(3)

    @property
    def n_cells(self) -> int:
        return int(np.prod(self.shape))

    @property
    def extent_mm(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) * self.pitch_mm

    def voxel_to_mm(self, voxel_coords: np.ndarray) -> np.ndarray:
        """Voxel coordinates (n, 3) to positions of the voxel centres in mm."""
        return self.origin_mm + (np.asarray(voxel_coords, dtype=np.float64) + 0.5) * self.pitch_mm

    def mm_to_voxel(self, positions: np.ndarray) -> np.ndarray:
        """Positions in mm to integer voxel coordinates (n, 3) (out-of-box values not clipped)."""
        return np.floor((np.asarray(positions, dtype=np.float64) - self.origin_mm) / self.pitch_mm).astype(np.int64)

    def _unravel(self, index: np.ndarray) -> np.ndarray:
        return np.stack(np.unravel_index(index, self.shape), axis=-1)

    def centers(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        if index is None and self.n_cells > 10_000_000:
            raise GeometryError(
                f"geometry {self.name!r} has {self.n_cells} voxels: ask for the centres of an index array"
            )
        return self.voxel_to_mm(self._unravel(self._check_index(index)))

    def sizes(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        n = self.n_cells if index is None else np.asarray(index).size
        return np.full((n, 3), self.pitch_mm)

    def locate(self, positions: np.ndarray) -> np.ndarray:
        ijk = self.mm_to_voxel(np.asarray(positions).reshape(-1, 3))
        inside = np.all((ijk >= 0) & (ijk < np.asarray(self.shape)), axis=1)
        out = np.full(ijk.shape[0], -1, dtype=np.int64)
        out[inside] = np.ravel_multi_index(tuple(ijk[inside].T), self.shape)
        return out

    @cached_property
    def material_frame(self) -> MaterialFrame:
        """Position in the volume about its centre, every axis in radiation lengths of the medium."""
        return isotropic_frame(self.origin_mm + self.extent_mm / 2, self.material.x0_mm)

    # ------------------------------------------------------------------ behaviour (see Geometry)
    def move_by_symmetry(self, pos, phi, events, point_event, generator=None) -> bool:
        """Reflections of each axis about the volume's centre and swaps of axes of equal length
        (the 48 symmetries of a cube for a cubic volume); ``phi`` is left alone."""
        import torch

        n = events.numel()
        centre = torch.as_tensor(self.origin_mm + self.extent_mm / 2, dtype=torch.float64, device=pos.device)
        relative = pos.double() - centre
        shape = torch.tensor(self.shape)
        # a random permutation among axes of equal length: sort random keys within each length class
        keys = torch.rand(n, 3, generator=generator) + shape.double()[None, :] * 10
        permutation = torch.argsort(keys, dim=1).to(pos.device)  # equal lengths stay in their own class
        signs = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0).to(pos.device)
        order = torch.argsort(shape.double()[None, :].expand(n, 3), dim=1, stable=True).to(pos.device)
        target = torch.empty_like(permutation)
        target.scatter_(1, order, permutation)  # axis j goes to axis target[j], within its length class
        moved = torch.empty_like(relative)
        moved.scatter_(1, target[point_event], relative * signs[point_event])
        pos.copy_((moved + centre).to(pos.dtype))
        return True

    def extent_text(self) -> str:
        return " x ".join(f"{e:.0f}" for e in self.extent_mm) + " mm"

    def simulate_events(self, n_events, rng, *, particles, energy_range, theta_range, target_points=None):
        """LArTPC events of :func:`pcfm.sim.simulate_lartpc_events`, grown to ``target_points``
        (lo, hi) points when given (the particle, energy and angle choices do not apply)."""
        from pcfm.data import EventList, lartpc_to_data
        from pcfm.sim import simulate_lartpc_events

        events = simulate_lartpc_events(n_events, rng=rng, target_points=target_points)
        return EventList([lartpc_to_data(event, self) for event in events])

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "description": self.description,
            "shape": list(self.shape), "pitch_mm": self.pitch_mm, "material": self.material.name,
            "origin_mm": self.origin_mm.tolist(),
        }

    @classmethod
    def from_dict(cls, spec: dict) -> "VoxelGridGeometry":
        spec = dict(spec)
        spec.pop("kind", None)
        return cls(**spec)
