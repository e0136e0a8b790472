"""The interface every detector geometry implements.

A geometry maps a cell index to the cell's physical position and size (mm) and back, so that
data from any detector becomes a point cloud in millimetres: models then see geometry, not
indices, and the same weights run on any detector.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from pcfm.geometry.frame import MaterialFrame


class Geometry(ABC):
    """A detector readout: ``n_cells`` cells with positions and sizes in mm."""

    #: "calorimeter" or "voxel_grid"
    kind: str = ""
    #: Cells below this energy (MeV, in the units of the files) read zero; none by default.
    readout_threshold_mev: float = 0.0

    def __init__(self, name: str, description: str = ""):
        self.name = name
        self.description = description

    @property
    @abstractmethod
    def n_cells(self) -> int:
        """Number of readout cells."""

    @abstractmethod
    def centers(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """Cell centres (n, 3) in mm, for the cells ``index`` (all cells when None)."""

    @abstractmethod
    def sizes(self, index: Optional[np.ndarray] = None) -> np.ndarray:
        """Cell extents (n, 3) in mm along the geometry's three axes."""

    @abstractmethod
    def locate(self, positions: np.ndarray) -> np.ndarray:
        """Cell index of each position (n, 3) in mm; -1 where a position is outside every cell."""

    @property
    def material_frame(self) -> "MaterialFrame":
        """The map from this geometry's mm to its detector frame in material units
        (:mod:`pcfm.geometry.frame`); the backbone reads every position through it. A new kind of
        geometry must provide one."""
        raise NotImplementedError(f"geometry kind {type(self).__name__} defines no material frame")

    # ------------------------------------------------------------------ behaviour the data path asks for
    def move_by_symmetry(self, pos, phi, events, point_event, generator=None) -> bool:
        """Move the points of ``events`` (tensor of event indices), in place, by one random
        symmetry of the detector per event that keeps every cell on the cell lattice
        (:func:`pcfm.data.augment.augment_by_symmetry`).

        ``pos`` (n, 3) mm holds the points of those events, ``point_event`` (n,) the position
        of each point's event in ``events``, ``phi`` (all events' incident azimuths, or None) is
        updated in place where the symmetry turns the incident direction. Returns False when
        the geometry knows no symmetry (the events are left as they are); default.
        """
        return False

    def spread_within_cells(self, pos, jitter):
        """Points ``pos`` (n, 3) mm moved by ``jitter`` (n, 3), uniform in +-half the cell size
        along the geometry's three cell axes, so that they stay in their cells (diffusion's
        dequantisation). Default: box-shaped cells along x, y, z."""
        return pos + jitter

    def extent_text(self) -> str:
        """The detector's size in a few words (``pcfm geometries``)."""
        return ""

    def simulate_events(self, n_events: int, rng: np.random.Generator, *, particles: np.ndarray,
                        energy_range: tuple[float, float], theta_range, target_points=None):
        """``n_events`` events of this detector from pcfm's fast simulators, as a dataset of PyG
        ``Data`` (pretraining without files, :func:`pcfm.engine.data.simulate_pretraining_events`).

        ``particles`` holds the PDG codes to draw each event's particle from, ``energy_range`` (MeV) the log-uniform
        incident energies, ``theta_range`` the polar angle (radians, a number or (lo, hi)),
        ``target_points`` (lo, hi) the point count of grown events where the kind has such a knob;
        a kind ignores what does not apply to it. Default: no simulator, a clear error.
        """
        raise ValueError(f"no simulator for geometry {self.name!r} (kind {self.kind!r}): give data= (files or "
                         f"events) to train on it; pcfm.sim simulates cylindrical calorimeters and voxel grids")

    @abstractmethod
    def to_dict(self) -> dict:
        """A plain dictionary (the YAML schema) from which :func:`pcfm.geometry.from_dict` rebuilds it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_cells={self.n_cells})"

    def _check_index(self, index: Optional[np.ndarray]) -> np.ndarray:
        if index is None:
            return np.arange(self.n_cells)
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_cells):
            raise IndexError(f"cell index out of range [0, {self.n_cells}) for geometry {self.name!r}")
        return index
