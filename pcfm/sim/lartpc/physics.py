"""Particle and liquid-argon constants, the simulator's configuration, and energy loss
(Bethe, CSDA range, Landau-like fluctuations, photon cross sections, multiple scattering)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from pcfm.geometry.materials import MATERIALS


# --- particles ---------------------------------------------------------------------------
M_E, M_MU, M_PI, M_P = 0.51099895, 105.6583755, 139.57039, 938.27208816  # MeV
C_MM_PER_NS = 299.792458
MICHEL_MAX_ENERGY = (M_MU**2 + M_E**2) / (2 * M_MU)  # 52.83 MeV, total energy
MUON_LIFETIME_NS = 2196.98
MU_MINUS_ARGON_LIFETIME_NS = 537.0  # bound mu- in argon: decay and capture compete
PI_PLUS_DECAY_MUON_KE = 4.12  # MeV, kinetic energy of the muon from pi+ -> mu+ nu at rest

# PILArNet-M semantic classes and particle ids
SEM_SHOWER, SEM_TRACK, SEM_MICHEL, SEM_DELTA, SEM_LOW_ENERGY = 0, 1, 2, 3, 4
PID_PHOTON, PID_ELECTRON, PID_MUON, PID_PION, PID_PROTON, PID_LOW_ENERGY = 0, 1, 2, 3, 4, -1

#: PDG code -> (PILArNet particle id, mass MeV, electric charge)
PRIMARIES = {
    22: (PID_PHOTON, 0.0, 0), 11: (PID_ELECTRON, M_E, -1), -11: (PID_ELECTRON, M_E, 1),
    13: (PID_MUON, M_MU, -1), -13: (PID_MUON, M_MU, 1),
    211: (PID_PION, M_PI, 1), -211: (PID_PION, M_PI, -1), 2212: (PID_PROTON, M_P, 1),
}

# --- liquid argon ------------------------------------------------------------------------
_LAR = MATERIALS["LAr"]  # PDG constants, shared with the geometries
LAR_DENSITY = _LAR.density_g_cm3  # g/cm3
LAR_RADIATION_LENGTH_MM = _LAR.x0_mm
LAR_CRITICAL_ENERGY = _LAR.critical_energy_mev  # MeV
LAR_MOLIERE_RADIUS_MM = _LAR.moliere_radius_mm  # not an input: the cascade's scattering produces it (tests check)
LAR_ELECTRON_DEDX = 0.21  # MeV/mm, collision loss of electrons (about a MIP)
_Z_OVER_A, _I_EXCITATION = 18.0 / 39.948, 188.0e-6  # mean excitation energy in MeV
_STERNHEIMER = dict(c_bar=5.2146, x0=0.2, x1=3.0, a=0.19559, k=3.0)  # density effect, LAr
_BETHE_K = 0.307075 * _Z_OVER_A * LAR_DENSITY / 10.0  # K Z/A rho, MeV/mm
_XI_PER_MM = 0.5 * _BETHE_K  # Landau width per mm times beta^2
_ELECTRONS_PER_MM3 = 6.02214076e23 * _Z_OVER_A * LAR_DENSITY / 1000.0
_KLEIN_NISHINA_PREFACTOR = 2 * math.pi * (2.8179403262e-12) ** 2  # 2 pi r_e^2 in mm^2
# pair-production cross section relative to its complete-screening limit 7/(9 X0), argon
_PAIR_LOG_E = np.log([1.022, 1.5, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1e3, 1e4, 1e5])
_PAIR_FRACTION = np.array([0.0, 0.005, 0.015, 0.165, 0.31, 0.46, 0.63, 0.72, 0.89, 0.97, 0.99])
_MOYAL_MEAN = 0.5772156649 + math.log(2.0)  # mean of the standard Moyal law: Euler's gamma + ln 2


@dataclass
class LArTPCConfig:
    """Parameters of :class:`LArTPCSimulator`. Energies MeV, lengths mm, times ns.

    Event composition (when no ``target_points`` is asked for): ``particles_per_event`` primaries
    (inclusive range) shared among ``interactions_per_event`` vertices, plus a Poisson number of
    cosmic muons of mean ``cosmics_per_event``. Primary species are drawn from ``particle_mix``
    (PDG code -> weight) with kinetic energies uniform in ``energy_ranges`` (keyed by |PDG|).
    The defaults give a median of ~3.5k points per event (5-95%: ~0.4k-9k) and point shares
    shower/track/Michel/delta/low-energy of about 43/32/0.7/4.5/20% (PILArNet-M: 37/39/0.65/1.75/22).
    """

    box_voxels: int = 768
    voxel_mm: float = 3.0
    step_mm: float = 3.0  # physics step of tracks (scattering, energy loss, delta rays)
    substeps: int = 3  # deposits per step, so tracks light every voxel they cross

    particles_per_event: tuple = (1, 5)
    interactions_per_event: tuple = (1, 3)
    cosmics_per_event: float = 1.0
    particle_mix: dict = field(default_factory=lambda: {
        22: 0.25, 11: 0.25, 13: 0.08, -13: 0.08, 211: 0.06, -211: 0.06, 2212: 0.22})
    energy_ranges: dict = field(default_factory=lambda: {
        22: (50.0, 1500.0), 11: (50.0, 1500.0), 13: (50.0, 1500.0), 211: (50.0, 800.0),
        2212: (30.0, 500.0)})
    vertex_margin_mm: float = 100.0  # interaction vertices keep this far from the walls
    cosmic_energy_range: tuple = (100.0, 10000.0)  # log-uniform kinetic energy
    cosmic_time_window_ns: float = 1.0e6  # cosmic arrival times are uniform in +-half of it

    delta_ray_threshold: float = 3.0  # delta electrons above this are explicit clusters
    brem_photon_cut: float = 1.0  # softer bremsstrahlung is deposited on the electron's path
    brem_segment_x0: float = 0.5  # electrons above the critical energy move in such segments
    photon_absorb_energy: float = 0.1  # photons below this are absorbed (photoelectric)
    low_energy_threshold: float = 2.0  # photon interactions giving less form low-energy deposits
    mu_minus_capture_probability: float = 1.0 - MU_MINUS_ARGON_LIFETIME_NS / MUON_LIFETIME_NS
    pion_interaction_length_mm: float = 900.0
    low_energy_blip_fraction: float = 0.15  # share of points from random blips near activity
    blip_distance_mm: float = 100.0  # mean distance of a blip from the deposit that caused it

    electric_field: float = 0.5  # kV/cm
    box_alpha: float = 0.93  # modified box recombination model (ArgoNeuT)
    box_beta: float = 0.212  # (kV/cm)(g/cm2)/MeV
    ionisation_energy: float = 23.6e-6  # MeV per electron-ion pair
    charge_noise_electrons: float = 500.0  # readout noise per voxel

    max_failed_rounds: int = 10  # target mode: rounds in a row adding nothing before giving up

    def __post_init__(self):
        for name in ("particles_per_event", "interactions_per_event"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        unknown = set(self.particle_mix) - set(PRIMARIES)
        if unknown:
            raise ValueError(f"particle_mix has unsupported PDG codes {sorted(unknown)}; "
                             f"supported: {sorted(PRIMARIES)}")
        missing = {abs(p) for p in self.particle_mix} - set(self.energy_ranges)
        if missing:
            raise ValueError(f"energy_ranges lacks |PDG| codes {sorted(missing)}")
        if not 0.0 <= self.low_energy_blip_fraction < 1.0:
            raise ValueError("low_energy_blip_fraction must be in [0, 1)")
        if not 0 < self.photon_absorb_energy < self.low_energy_threshold < LAR_CRITICAL_ENERGY:
            raise ValueError("need 0 < photon_absorb_energy < low_energy_threshold < critical energy")
        if self.cosmics_per_event < 0:
            raise ValueError("cosmics_per_event must be >= 0")

    @property
    def box_mm(self) -> float:
        return self.box_voxels * self.voxel_mm


# --- energy loss -------------------------------------------------------------------------

def bethe_dedx(kinetic, mass, t_cut=None):
    """Mean collision stopping power of liquid argon in MeV/mm (Bethe with density effect).

    With ``t_cut`` it is the restricted stopping power: only energy transfers below ``t_cut``,
    the rest being explicit delta rays. Valid above beta*gamma ~ 0.05.
    """
    kinetic = np.asarray(kinetic, dtype=float)
    gamma = 1.0 + kinetic / mass
    bg2 = gamma**2 - 1.0
    beta2 = bg2 / gamma**2
    ratio = M_E / mass
    t_max = 2 * M_E * bg2 / (1 + 2 * gamma * ratio + ratio**2)
    t_up = t_max if t_cut is None else np.minimum(t_cut, t_max)
    x = 0.5 * np.log10(bg2)
    s = _STERNHEIMER
    density = np.where(x >= s["x1"], 2 * np.log(10) * x - s["c_bar"],
                       np.where(x >= s["x0"],
                                2 * np.log(10) * x - s["c_bar"] + s["a"] * (s["x1"] - x) ** s["k"], 0.0))
    bracket = (0.5 * np.log(2 * M_E * bg2 * t_up / _I_EXCITATION**2)
               - 0.5 * beta2 * (1 + t_up / t_max) - 0.5 * density)
    return _BETHE_K / beta2 * bracket


@lru_cache(maxsize=8)
def _range_table(mass: float):
    """log(kinetic energy) and log(CSDA range) grids for a particle of ``mass`` in argon.

    Bethe above beta*gamma = 0.05; below it a Bragg-Kleeman power law R ~ T^1.75 joined
    continuously, where Bethe is no longer valid and the remaining range is below 0.1 mm.
    """
    power = 1.75
    log_t = np.linspace(np.log(1e-3), np.log(1e6), 4000)
    t = np.exp(log_t)
    t_low = mass * (math.sqrt(1 + 0.05**2) - 1)
    s_low = float(bethe_dedx(t_low, mass))
    stopping = np.where(t < t_low, s_low * (t / t_low) ** (1 - power), bethe_dedx(np.maximum(t, t_low), mass))
    integrand = t / stopping  # dR/dlog T
    r = t[0] / (power * stopping[0]) + np.concatenate(
        [[0.0], np.cumsum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(log_t))])
    return log_t, np.log(r)


def csda_range(kinetic, mass):
    """Continuous-slowing-down range (mm) of a heavy charged particle in liquid argon."""
    log_t, log_r = _range_table(float(mass))
    kinetic = np.asarray(kinetic, dtype=float)
    return np.where(kinetic > 0, np.exp(np.interp(np.log(np.maximum(kinetic, 1e-30)), log_t, log_r)), 0.0)


def _range_of(kinetic, mass):
    """CSDA range (mm) for arrays of kinetic energies and masses."""
    out = np.zeros_like(kinetic)
    for m in np.unique(mass):
        sel = mass == m
        out[sel] = csda_range(kinetic[sel], m)
    return out


def _kinetic_from_range(residual, mass):
    """Kinetic energy left with ``residual`` range (mm); ``mass`` is an array, one per entry."""
    out = np.zeros_like(residual)
    for m in np.unique(mass):
        sel = (mass == m) & (residual > 0)
        log_t, log_r = _range_table(float(m))
        out[sel] = np.exp(np.interp(np.log(residual[sel]), log_r, log_t))
    return out


def photon_attenuation(energy):
    """(Compton, pair) attenuation coefficients of liquid argon in 1/mm for photon energies in MeV.

    Compton from the Klein-Nishina cross section on argon's electrons; pair production scales
    its complete-screening limit 7/(9 X0) by a tabulated threshold factor.
    """
    k = np.maximum(np.asarray(energy, dtype=float), 1e-3) / M_E
    l2k = np.log1p(2 * k)
    sigma = _KLEIN_NISHINA_PREFACTOR * ((1 + k) / k**2 * (2 * (1 + k) / (1 + 2 * k) - l2k / k)
                                        + l2k / (2 * k) - (1 + 3 * k) / (1 + 2 * k) ** 2)
    pair = np.interp(np.log(k * M_E), _PAIR_LOG_E, _PAIR_FRACTION) * 7.0 / (9.0 * LAR_RADIATION_LENGTH_MM)
    return sigma * _ELECTRONS_PER_MM3, pair


def photon_interaction_length(energy):
    """Mean free path (mm) of a photon in liquid argon; tends to 9/7 X0 at high energy."""
    compton, pair = photon_attenuation(energy)
    return 1.0 / (compton + pair)


def _highland(momentum, beta, length, clip):
    """Plane multiple-scattering width (rad) after ``length`` mm of argon, Highland formula."""
    x = np.maximum(length, 1e-6) / LAR_RADIATION_LENGTH_MM
    theta = 13.6 / (beta * momentum) * np.sqrt(x) * np.maximum(1 + 0.038 * np.log(x / beta**2), 0.0)
    return np.minimum(theta, clip)


def _landau_like(mean, xi, t_up, beta2, rng):
    """Energy losses with the given means, fluctuating like a Landau (Moyal) distribution.

    The width is the Landau scale ``xi``, narrowed to the Bohr (Gaussian) variance
    xi * t_up * (1 - beta^2/2) when the largest transfer ``t_up`` makes that smaller.
    """
    width = np.minimum(xi, np.sqrt(2 * xi * t_up * (1 - beta2 / 2)) / np.pi)
    moyal = -np.log(np.maximum(rng.standard_normal(mean.shape) ** 2, 1e-12)) - _MOYAL_MEAN
    return np.maximum(mean + width * moyal, 0.1 * mean)  # a step always leaves some charge
