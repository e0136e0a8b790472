"""In-memory containers shared by the readers, writers, simulators and point-cloud converters.

Units: energies in MeV, lengths in mm, angles in radians. Particles are PDG codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pcfm.errors import DataError

#: PDG codes of the particles pcfm simulates and classifies.
ELECTRON, PHOTON, PION = 11, 22, 211
PARTICLE_NAMES = {ELECTRON: "electron", PHOTON: "photon", PION: "pion"}
#: Event-classification targets: ``y = PARTICLE_CLASSES.index(pdg)``.
PARTICLE_CLASSES = (ELECTRON, PHOTON, PION)

#: PILArNet-M semantic classes (per point) and particle ids (per cluster, v2 only).
SEMANTIC_CLASSES = ("shower", "track", "michel", "delta", "low_energy")
PILARNET_PARTICLES = {0: "photon", 1: "electron", 2: "muon", 3: "pion", 4: "proton", -1: "low_energy"}


@dataclass
class CaloShowers:
    """Voxelised calorimeter showers on one geometry, in CaloChallenge voxel order.

    ``showers[i]`` holds the energy (MeV) of every cell of ``geometry``, flattened as
    (layer, angular bin, radial bin) with the radial index fastest.
    """

    incident_energies: np.ndarray  # (N,) MeV
    showers: np.ndarray  # (N, n_voxels) MeV
    geometry: Optional[str] = None  # geometry name, see pcfm.geometry.get
    theta: Optional[np.ndarray] = None  # (N,) polar angle of the incident particle, radians
    phi: Optional[np.ndarray] = None  # (N,) azimuthal angle, radians
    particle: Optional[np.ndarray] = None  # (N,) PDG code

    def __post_init__(self):
        self.incident_energies = np.asarray(self.incident_energies).reshape(-1)
        self.showers = np.asarray(self.showers)
        if self.showers.ndim != 2 or self.showers.shape[0] != self.incident_energies.shape[0]:
            raise DataError(
                f"showers must have shape (N, n_voxels) with N = {self.incident_energies.shape[0]} "
                f"incident energies, got {self.showers.shape}"
            )
        for name in ("theta", "phi", "particle"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value).reshape(-1)
                if value.shape[0] != len(self):
                    raise DataError(f"{name} has {value.shape[0]} entries for {len(self)} showers")
                setattr(self, name, value)

    def __len__(self) -> int:
        return int(self.incident_energies.shape[0])

    def subset(self, index) -> "CaloShowers":
        """The showers selected by ``index`` (a slice, an integer array or a boolean mask)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return CaloShowers(
            self.incident_energies[index], self.showers[index], self.geometry,
            pick(self.theta), pick(self.phi), pick(self.particle),
        )


@dataclass
class LArEvent:
    """One LArTPC event in the PILArNet-M layout.

    ``points`` rows are (x, y, z, energy, energy_2, time, n_electrons, dx) with x, y, z in voxel
    units of the 768^3 box; ``clusters`` rows are (size, fragment id, group id, interaction id,
    semantic class[, particle id]) and the points are stored cluster after cluster.
    """

    points: np.ndarray  # (n, 8) float32
    clusters: np.ndarray  # (m, 5) v1 or (m, 6) v2
    cluster_extra: Optional[np.ndarray] = None  # (m, 5) v2: mass, momentum, vertex x, y, z
    meta: dict = field(default_factory=dict)

    @property
    def version(self) -> int:
        return 2 if self.clusters.shape[1] == 6 else 1

    @property
    def cluster_sizes(self) -> np.ndarray:
        return self.clusters[:, 0].astype(np.int64)

    @property
    def semantic(self) -> np.ndarray:
        """Per-point semantic class (0 shower, 1 track, 2 Michel, 3 delta, 4 low energy)."""
        return np.repeat(self.clusters[:, 4].astype(np.int64), self.cluster_sizes)

    @property
    def particle_id(self) -> np.ndarray:
        """Per-point particle id (v2 only; -1 for low-energy deposits)."""
        if self.version < 2:
            raise DataError("particle ids exist only in the PILArNet-M v2 layout")
        return np.repeat(self.clusters[:, 5].astype(np.int64), self.cluster_sizes)

    def validate(self, path=None, event=None) -> None:
        """Raise :class:`DataError` naming ``path`` and ``event`` if the event is inconsistent."""
        p, c = self.points, self.clusters
        if p.ndim != 2 or p.shape[1] != 8:
            raise DataError(f"'point' must reshape to (-1, 8), got shape {p.shape}", path, event)
        if c.ndim != 2 or c.shape[1] not in (5, 6):
            raise DataError(f"'cluster' must reshape to (-1, 5) or (-1, 6), got {c.shape}", path, event)
        if p.shape[0] == 0:
            raise DataError("event has no points", path, event)
        if not np.all(np.isfinite(p)):
            raise DataError("non-finite value (NaN or inf) in 'point'", path, event)
        if np.any(c[:, 0] < 0):
            k = int(np.argmax(c[:, 0] < 0))
            raise DataError(f"cluster {k} has a negative size ({int(c[k, 0])} points)", path, event)
        if int(c[:, 0].sum()) != p.shape[0]:
            raise DataError(
                f"cluster sizes sum to {int(c[:, 0].sum())} but the event has {p.shape[0]} points",
                path, event,
            )
        if self.cluster_extra is not None and self.cluster_extra.shape != (c.shape[0], 5):
            raise DataError(
                f"'cluster_extra' must reshape to ({c.shape[0]}, 5), got {self.cluster_extra.shape}",
                path, event,
            )
