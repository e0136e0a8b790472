"""Material constants for calorimeters and time-projection chambers.

Values from the PDG tables of atomic and nuclear properties of materials: radiation length X0,
Moliere radius R_M, critical energy E_c (for electrons), nuclear interaction length lambda_I,
and the minimum-ionising dE/dx. Lengths in mm, energies in MeV.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pcfm.errors import GeometryError

#: Scale energy of multiple scattering used in the Moliere radius, R_M = E_s X0 / E_c (MeV).
SCALE_ENERGY_MEV = 21.2


@dataclass(frozen=True)
class Material:
    name: str
    density_g_cm3: float
    x0_mm: float
    moliere_radius_mm: float
    critical_energy_mev: float
    interaction_length_mm: float
    mip_dedx_mev_per_mm: float

    def to_dict(self) -> dict:
        return asdict(self)


_TABLE = [
    # name, density, X0, R_M, E_c, lambda_I, MIP dE/dx
    Material("W", 19.30, 3.504, 9.327, 7.97, 99.46, 2.210),
    Material("Pb", 11.35, 5.612, 16.02, 7.43, 182.6, 1.273),
    Material("Fe", 7.874, 17.57, 16.97, 21.68, 167.7, 1.143),
    Material("Cu", 8.960, 14.36, 15.66, 19.42, 153.2, 1.257),
    Material("Si", 2.329, 93.70, 48.65, 40.19, 465.2, 0.3876),
    Material("Scintillator", 1.060, 413.1, 94.06, 93.11, 770.7, 0.2052),  # polystyrene
    Material("PbWO4", 8.300, 8.903, 19.59, 9.64, 207.7, 1.020),
    Material("LAr", 1.396, 140.0, 90.43, 32.84, 857.7, 0.2105),
]
MATERIALS: dict[str, Material] = {m.name: m for m in _TABLE}


def get_material(name: str | Material) -> Material:
    """Look a material up by name (case-insensitive); a Material is returned as is."""
    if isinstance(name, Material):
        return name
    for key, material in MATERIALS.items():
        if key.lower() == str(name).lower():
            return material
    raise GeometryError(f"unknown material {name!r}; known: {', '.join(MATERIALS)}")
