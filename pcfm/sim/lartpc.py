"""Fast physics-based LArTPC event simulator with output in the PILArNet-M v2 layout.

Users without a data set get quick-start events from here, and the LArTPC pipeline is tested
on them, so the events are built like PILArNet-M: a 768^3 box of 3 mm voxels, one point per
(cluster, voxel) with columns (x, y, z, energy, energy_2, time, n_electrons, dx), the
low-energy cluster first, cluster rows (size, fragment, group, interaction, semantic class,
particle id) and cluster_extra rows (mass, momentum, vertex x, y, z in voxel units).

The physics is a condensed, vectorised stand-in for Geant4 in liquid argon:

* heavy charged tracks (muons, pions, protons) are stepped in ~1 voxel steps. The mean energy
  loss per step comes from the continuous-slowing-down range of the Bethe formula (Bragg peak
  included), the part below the delta-ray threshold fluctuates Landau-like (a Moyal law), delta
  rays above it are emitted explicitly with the 1/T^2 spectrum, and the direction random-walks
  by Highland multiple scattering;
* stopping muons decay to a Michel electron (mu+ always, mu- unless captured), stopping pi+
  decay to a 4.1 MeV muon, pi- are absorbed into a few protons, and pions in flight interact
  hadronically into a few secondary tracks;
* electrons and photons develop a stochastic EM cascade: photons fly an exponential distance
  set by the Klein-Nishina and pair-production cross sections (9/7 X0 at high energy) and then
  pair-produce, Compton-scatter or are absorbed; electrons above the critical energy radiate
  bremsstrahlung photons along X0/2 segments, below it they deposit their energy on a short
  scattering track. A photon interaction giving its electrons at least ``low_energy_threshold``
  starts a new shower fragment (cluster) of the same group; smaller ones, the Compton chains of
  softer photons and random small blips near the activity form the low-energy cluster;
* charge: modified-box recombination gives ``n_electrons``, and ``energy_2`` is the energy
  reconstructed from that charge with readout noise (calibrated on a MIP).

Units: MeV, mm, ns, radians internally; output coordinates and vertices in voxel units.
Primaries are given as PDG codes; cluster rows carry PILArNet particle ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from pcfm.data.events import LArEvent
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


# --- geometry helpers --------------------------------------------------------------------

def _isotropic(n, rng):
    cos_t = rng.uniform(-1, 1, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    sin_t = np.sqrt(1 - cos_t**2)
    return np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)


def _cross(a, b):
    """Row-wise cross product (np.cross is slow on many small calls)."""
    return np.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], axis=1)


def _deflect(direction, cos_theta, rng):
    """Turn unit vectors by polar angles ``acos(cos_theta)`` about them, random azimuth."""
    u = _cross(direction, np.where(np.abs(direction[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = _cross(direction, u)
    phi = rng.uniform(0, 2 * np.pi, direction.shape[0])[:, None]
    cos_theta = np.clip(cos_theta, -1, 1)[:, None]
    sin_theta = np.sqrt(1 - cos_theta**2)
    return cos_theta * direction + sin_theta * (np.cos(phi) * u + np.sin(phi) * v)


def _compton(energy, direction, rng):
    """Compton scattering: (scattered photon energy, its direction, recoil electron direction).

    The energy fraction eps = E'/E follows Klein-Nishina, sampled from a 1/eps proposal."""
    k = energy / M_E
    eps_min = 1 / (1 + 2 * k)

    def cos_theta(eps, idx):
        return 1 - (1 / eps - 1) / k[idx]

    eps = _rejection(k.size, lambda i: eps_min[i] ** rng.random(i.size),
                     lambda e, i: (1 + e**2 - e * (1 - cos_theta(e, i) ** 2)) / 2, rng)
    scattered_dir = _deflect(direction, cos_theta(eps, np.arange(k.size)), rng)
    scattered = eps * energy
    recoil = energy[:, None] * direction - scattered[:, None] * scattered_dir
    recoil /= np.maximum(np.linalg.norm(recoil, axis=1, keepdims=True), 1e-12)
    return scattered, scattered_dir, recoil


def _distance_to_exit(pos, direction, size):
    """Distance along ``direction`` from ``pos`` to the wall of the cube [0, size]^3."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(direction > 0, (size - pos) / direction,
                     np.where(direction < 0, -pos / direction, np.inf))
    return np.maximum(t.min(axis=1), 0.0)


def _inside(pos, size):
    return np.all((pos >= 0) & (pos < size), axis=1)


def _qmul(a, b):
    """Hamilton product of quaternions given as (w, x, y, z) tuples of arrays."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return (aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw)


def _walk(start, direction, n_steps, step_len, theta0, rng):
    """Step a batch of tracks through multiple scattering, all steps at once.

    Track ``i`` has ``n_steps[i]`` consecutive entries of the flat ``step_len``/``theta0``.
    Each step turns the track in its own frame by a Rayleigh angle of width ``theta0`` with a
    random azimuth. Composing these body-frame rotations is a prefix product of quaternions,
    done for all tracks together as a segmented parallel scan (log2 of the longest track
    passes), so no Python loop runs over steps.

    Returns the start point and unit direction of every step, shapes (S, 3).
    """
    track = np.repeat(np.arange(n_steps.size), n_steps)
    first = (np.cumsum(n_steps) - n_steps)[track]
    rank = np.arange(track.size) - first

    angle = theta0 * np.sqrt(-2 * np.log(1 - rng.random(track.size)))
    angle[rank == 0] = 0.0  # the first step keeps the initial direction
    phi = rng.uniform(0, 2 * np.pi, track.size)
    half = 0.5 * angle
    q = [np.cos(half), np.sin(half) * np.cos(phi), np.sin(half) * np.sin(phi), np.zeros_like(half)]
    shift = 1
    while shift < n_steps.max():
        same_track = rank[shift:] >= shift
        product = _qmul([c[:-shift] for c in q], [c[shift:] for c in q])
        for c, new in zip(q, product):
            c[shift:] = np.where(same_track, new, c[shift:])
        shift *= 2

    # initial orientation: the rotation taking +z onto each track's direction
    d = direction
    q0 = np.stack([1 + d[:, 2], -d[:, 1], d[:, 0], np.zeros(len(d))], axis=1)
    q0[q0[:, 0] < 1e-9] = [0.0, 1.0, 0.0, 0.0]  # direction -z: half turn about x
    q0 /= np.linalg.norm(q0, axis=1, keepdims=True)
    w, x, y, z = _qmul(q0[track].T, q)
    dirs = np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], axis=1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

    travel = np.cumsum(dirs * step_len[:, None], axis=0)
    travel -= dirs * step_len[:, None]  # exclusive sum
    return start[track] + travel - travel[first], dirs


def _segment_offsets(values, n_steps):
    """Per-track exclusive running sums of a flat per-step array."""
    first = np.repeat(np.cumsum(n_steps) - n_steps, n_steps)
    total = np.cumsum(values, axis=0)
    total -= values
    return total - total[first]


def _take(batch, index):
    return {key: value[index] for key, value in batch.items()}


def _concat(batches):
    batches = [b for b in batches if b is not None and len(b["pos"])]
    if not batches:
        return None
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _renumber(values, ids):
    """Position of each value in the sorted array ``ids``, -1 where it is absent."""
    values = values.astype(np.int64)
    if len(ids) == 0:
        return np.full(len(values), -1)
    pos = np.minimum(np.searchsorted(ids, values), len(ids) - 1)
    return np.where(ids[pos] == values, pos, -1)


def _rejection(n, propose, accept, rng):
    """Vectorised rejection sampling: ``propose(idx)`` draws for items ``idx``, kept with
    probability ``accept(x, idx)``."""
    out = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        x = propose(todo)
        ok = rng.random(todo.size) < accept(x, todo)
        out[todo[ok]] = x[ok]
        todo = todo[~ok]
    return out


# --- one event being simulated -----------------------------------------------------------

class _EventRecord:
    """Energy deposits and cluster rows of the event under construction.

    Cluster 0 is the low-energy cluster. Rows are (group, interaction, semantic, particle id,
    mass, momentum, vertex x, y, z in mm); deposits are (x, y, z in mm, energy, dx, time,
    cluster, interaction), the last column letting the target mode drop whole interactions.
    """

    def __init__(self):
        self.rows = [np.array([[-1, -1, SEM_LOW_ENERGY, PID_LOW_ENERGY, 0, 0, np.nan, np.nan, np.nan]])]
        self.n_clusters = 1
        self.n_groups = 0
        self.deposits = []

    def new_groups(self, n):
        self.n_groups += n
        return np.arange(self.n_groups - n, self.n_groups)

    def add_clusters(self, group, interaction, semantic, pid, mass, momentum, vertex):
        n = len(vertex)
        rows = np.empty((n, 9))
        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = group, interaction, semantic, pid
        rows[:, 4], rows[:, 5], rows[:, 6:] = mass, momentum, vertex
        self.rows.append(rows)
        self.n_clusters += n
        return np.arange(self.n_clusters - n, self.n_clusters)

    def deposit(self, pos, energy, dx, time, cluster, interaction):
        self.deposits.append(np.column_stack([pos, energy, dx, time, cluster, interaction]))


# --- the simulator -----------------------------------------------------------------------

class LArTPCSimulator:
    """Simulates LArTPC events in the PILArNet-M v2 layout (see the module docstring).

    ``config`` sets the physics and event composition; ``seed`` or ``rng`` (a
    ``np.random.Generator``, for sharing one stream) make runs reproducible.
    """

    def __init__(self, config: Optional[LArTPCConfig] = None, *, seed=None,
                 rng: Optional[np.random.Generator] = None):
        if seed is not None and rng is not None:
            raise ValueError("give either seed or rng, not both")
        self.config = config or LArTPCConfig()
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        cfg = self.config
        xi = cfg.box_beta * 10 * LAR_ELECTRON_DEDX / (LAR_DENSITY * cfg.electric_field)
        self._mip_recombination = math.log(cfg.box_alpha + xi) / xi

    # -- public API -------------------------------------------------------------------

    def event(self, target_points: Optional[tuple] = None) -> LArEvent:
        """One event; with ``target_points=(lo, hi)`` its point count lands near that range.

        Without a target the composition follows the config. With one, interactions (each with
        ``particles_per_event`` primaries) and cosmic muons are added until the expected point
        count reaches a goal drawn uniformly in (lo, hi), never adding one that would overshoot
        ``hi`` (see :meth:`_fill_to_target`).
        """
        if target_points is not None:
            lo, hi = target_points
            if not 0 < lo <= hi:
                raise ValueError(f"target_points must be (lo, hi) with 0 < lo <= hi, got {target_points}")
        for _ in range(100):
            record = _EventRecord()
            primaries = (self._fill_to_target(record, target_points) if target_points
                         else self._fill_default(record))
            event = self._finish(record, primaries)
            if event is not None:
                return event
        raise RuntimeError("100 simulated events in a row left no deposit inside the box")

    def events(self, n_events: int, target_points: Optional[tuple] = None) -> list[LArEvent]:
        """``n_events`` independent events (see :meth:`event`)."""
        return [self.event(target_points) for _ in range(n_events)]

    def particle_gun(self, pdg: Sequence[int], kinetic_energy: Sequence[float], vertex,
                     direction=None, *, low_energy_blips: bool = True) -> LArEvent:
        """One interaction of the given primaries (PDG codes, kinetic energies MeV) at
        ``vertex`` (mm, box corner at 0). ``direction`` is (3,) or (n, 3); isotropic if None.
        ``event.meta['primaries']`` maps each primary to its group id."""
        pdg = np.atleast_1d(np.asarray(pdg, dtype=np.int64))
        energy = np.broadcast_to(np.asarray(kinetic_energy, dtype=float), pdg.shape).copy()
        unknown = set(pdg.tolist()) - set(PRIMARIES)
        if unknown:
            raise ValueError(f"unsupported PDG codes {sorted(unknown)}; supported: {sorted(PRIMARIES)}")
        vertex = np.asarray(vertex, dtype=float).reshape(3)
        if not _inside(vertex[None], self.config.box_mm)[0]:
            raise ValueError(f"vertex {vertex.tolist()} mm lies outside the {self.config.box_mm} mm box")
        if direction is None:
            direction = _isotropic(len(pdg), self.rng)
        direction = np.broadcast_to(np.asarray(direction, dtype=float), (len(pdg), 3))
        direction = direction / np.linalg.norm(direction, axis=1, keepdims=True)
        record = _EventRecord()
        unit = self._interaction(record, 0, vertex, pdg, energy, direction)
        self._transport_units(record, [unit])
        event = self._finish(record, unit[0], blips=low_energy_blips)
        if event is None:
            raise RuntimeError("the particle gun left no deposit inside the box")
        return event

    # -- event composition --------------------------------------------------------------

    def _draw_count(self, bounds):
        return int(self.rng.integers(bounds[0], bounds[1] + 1))

    def _random_interaction(self, record, interaction, n):
        """``n`` primaries from the configured mix, isotropic from a random vertex."""
        cfg, rng = self.config, self.rng
        codes = np.array(list(cfg.particle_mix))
        weights = np.array(list(cfg.particle_mix.values()), dtype=float)
        pdg = rng.choice(codes, size=n, p=weights / weights.sum())
        ranges = np.array([cfg.energy_ranges[abs(int(p))] for p in pdg]).reshape(n, 2)
        energy = rng.uniform(ranges[:, 0], ranges[:, 1])
        vertex = rng.uniform(cfg.vertex_margin_mm, cfg.box_mm - cfg.vertex_margin_mm, 3)
        return self._interaction(record, interaction, vertex, pdg, energy, _isotropic(n, rng))

    def _fill_default(self, record):
        """The configured composition; returns the summary rows of the primaries."""
        cfg, rng = self.config, self.rng
        n_particles = self._draw_count(cfg.particles_per_event)
        n_int = min(self._draw_count(cfg.interactions_per_event), n_particles)
        counts = 1 + rng.multinomial(n_particles - n_int, np.full(n_int, 1.0 / n_int))
        units = [self._random_interaction(record, i, count) for i, count in enumerate(counts)]
        units += [self._cosmic(record, n_int + i) for i in range(rng.poisson(cfg.cosmics_per_event))]
        self._transport_units(record, units)
        return np.concatenate([u[0] for u in units])

    def _fill_to_target(self, record, target_points):
        """Add units (an interaction or a cosmic muon) until the point count reaches the goal.

        Units are simulated in rounds sized from the points per unit seen so far, then accepted
        in order while the expected total stays below ``hi``; the deposits of refused units are
        dropped at the end through their interaction id. Returns the accepted summary rows."""
        cfg, rng = self.config, self.rng
        lo, hi = target_points
        goal = rng.uniform(lo, hi)
        inflate = 1 / (1 - cfg.low_energy_blip_fraction)  # blips are added at the end
        mean_interactions = 0.5 * sum(cfg.interactions_per_event)
        p_cosmic = cfg.cosmics_per_event / (cfg.cosmics_per_event + mean_interactions)
        accepted, expected, simulated, per_unit, failures = [], 0.0, 0, None, 0
        while expected < goal and failures < cfg.max_failed_rounds and simulated < 4000:
            size = 4 if per_unit is None else int(np.clip((goal - expected) / per_unit, 4, 64))
            units = [self._cosmic(record, interaction) if rng.random() < p_cosmic
                     else self._random_interaction(record, interaction, self._draw_count(cfg.particles_per_event))
                     for interaction in range(simulated, simulated + size)]
            first_deposit = len(record.deposits)
            self._transport_units(record, units)
            points = self._points_per_interaction(record.deposits[first_deposit:], simulated + size)
            per_unit = max(points[simulated:].mean() * inflate, 1.0)
            taken = 0
            for unit, interaction in zip(units, range(simulated, simulated + size)):
                grown = expected + points[interaction] * inflate
                if expected < goal and (grown <= hi or (not accepted and failures == cfg.max_failed_rounds - 1)):
                    accepted.append(unit[0])
                    expected, taken = grown, taken + 1
            failures = 0 if taken else failures + 1
            simulated += size
        return np.concatenate(accepted) if accepted else np.empty((0, 10))

    def _points_per_interaction(self, deposits, n_interactions):
        """Number of points each interaction adds (its low-energy voxels counted on their own)."""
        if not deposits:
            return np.zeros(n_interactions)
        deposits, key = self._voxel_keys(np.concatenate(deposits))
        interaction = deposits[:, 7].astype(np.int64)
        unique = np.unique(key * n_interactions + interaction)
        return np.bincount(unique % n_interactions, minlength=n_interactions).astype(float)

    def _interaction(self, record, interaction, vertex, pdg, energy, direction):
        """Primaries from one vertex: a summary table, heavy tracks and EM particles."""
        n = len(pdg)
        pid, mass, charge = (np.array([PRIMARIES[int(p)][i] for p in pdg]) for i in range(3))
        groups = record.new_groups(n)
        pos = np.repeat(vertex[None], n, axis=0)
        heavy = np.isin(pid, [PID_MUON, PID_PION, PID_PROTON])
        tracks = dict(pid=pid[heavy], mass=mass[heavy], charge=charge[heavy], ke=energy[heavy],
                      pos=pos[heavy], dir=direction[heavy], time=np.zeros(heavy.sum()),
                      interaction=np.full(heavy.sum(), interaction), group=groups[heavy])
        em = self._em_primaries(record, pid[~heavy], energy[~heavy], pos[~heavy], direction[~heavy],
                                groups[~heavy], interaction)
        summary = np.column_stack([np.full(n, interaction), pdg, energy, pos / self.config.voxel_mm,
                                   direction, groups])
        return summary, tracks, em

    def _em_primaries(self, record, pid, energy, pos, direction, groups, interaction):
        electron = pid == PID_ELECTRON
        cluster = np.full(len(pid), -1)
        momentum = np.sqrt(energy**2 + 2 * energy * M_E)
        cluster[electron] = record.add_clusters(groups[electron], interaction, SEM_SHOWER, PID_ELECTRON,
                                                M_E, momentum[electron], pos[electron])
        n = len(pid)
        return dict(photon=~electron, energy=energy, pos=pos, dir=direction, time=np.zeros(n),
                    origin=pos.copy(), cluster=cluster, group=groups,
                    interaction=np.full(n, interaction), semantic=np.full(n, SEM_SHOWER), pid=pid)

    def _cosmic(self, record, interaction):
        """A cosmic muon (cos^2 zenith, y axis up) crossing a random point of the box."""
        cfg, rng = self.config, self.rng
        cos_zenith = rng.random() ** (1 / 3)
        phi = rng.uniform(0, 2 * np.pi)
        sin_zenith = math.sqrt(1 - cos_zenith**2)
        direction = np.array([[sin_zenith * math.cos(phi), -cos_zenith, sin_zenith * math.sin(phi)]])
        through = rng.uniform(0, cfg.box_mm, (1, 3))
        entry = through - direction * _distance_to_exit(through, -direction, cfg.box_mm)[:, None]
        entry = np.clip(entry, 0, np.nextafter(cfg.box_mm, 0))
        lo, hi = np.log(cfg.cosmic_energy_range)
        energy = np.exp(rng.uniform(lo, hi, 1))
        pdg = 13 if rng.random() < 1 / 2.25 else -13  # mu+/mu- = 1.25 at sea level
        group = record.new_groups(1)
        tracks = dict(pid=np.array([PID_MUON]), mass=np.array([M_MU]), charge=np.array([-np.sign(pdg)]),
                      ke=energy, pos=entry, dir=direction,
                      time=rng.uniform(-0.5, 0.5, 1) * cfg.cosmic_time_window_ns,
                      interaction=np.array([interaction]), group=group)
        summary = np.column_stack([[interaction], [pdg], energy, entry / cfg.voxel_mm, direction, group])
        return summary, tracks, None

    def _transport_units(self, record, units):
        """Transport the primaries of several units together (fewer, larger numpy passes)."""
        tracks = _concat([u[1] for u in units])
        em_from_tracks = []
        for _ in range(5):  # hadronic generations
            if tracks is None:
                break
            tracks, produced = self._transport_tracks(record, tracks)
            em_from_tracks.append(produced)
        self._cascade(record, _concat([u[2] for u in units] + em_from_tracks))

    # -- heavy charged tracks ---------------------------------------------------------

    def _transport_tracks(self, record, tr):
        """Step muons, pions and protons; return their secondary tracks and EM products."""
        cfg, rng = self.config, self.rng
        tr = _take(tr, _inside(tr["pos"], cfg.box_mm) & (tr["ke"] > 0))
        n = len(tr["ke"])
        if n == 0:
            return None, None
        mass, ke = tr["mass"], tr["ke"]
        momentum = np.sqrt(ke**2 + 2 * ke * mass)
        cluster = record.add_clusters(tr["group"], tr["interaction"], SEM_TRACK, tr["pid"], mass, momentum,
                                      tr["pos"])
        full_range = _range_of(ke, mass)
        interaction_at = np.where(tr["pid"] == PID_PION,
                                  rng.exponential(cfg.pion_interaction_length_mm, n), np.inf)
        interacts = interaction_at < full_range
        path = np.minimum(full_range, interaction_at)
        reach = _distance_to_exit(tr["pos"], tr["dir"], cfg.box_mm) + 5 * cfg.step_mm
        ends_inside = path <= reach
        length = np.minimum(path, reach)

        n_steps = np.maximum(np.ceil(length / cfg.step_mm).astype(np.int64), 1)
        track = np.repeat(np.arange(n), n_steps)
        travelled = _segment_offsets(np.full(track.size, cfg.step_mm), n_steps)
        step_len = np.minimum(cfg.step_mm, length[track] - travelled)
        residual = full_range[track] - travelled
        t_start = _kinetic_from_range(residual, mass[track])
        t_end = _kinetic_from_range(residual - step_len, mass[track])
        t_mid = 0.5 * (t_start + t_end)
        m = mass[track]
        gamma = 1 + t_mid / m
        beta2 = np.maximum(1 - 1 / gamma**2, 1e-8)
        p_mid = np.sqrt(t_mid**2 + 2 * t_mid * m)
        ratio = M_E / m
        t_max = 2 * M_E * (gamma**2 - 1) / (1 + 2 * gamma * ratio + ratio**2)
        cut = cfg.delta_ray_threshold
        has_deltas = t_max > cut
        restricted = np.ones_like(t_mid)
        restricted[has_deltas] = (bethe_dedx(t_mid[has_deltas], m[has_deltas], cut)
                                  / bethe_dedx(t_mid[has_deltas], m[has_deltas]))
        xi = _XI_PER_MM * step_len / beta2
        energy = _landau_like((t_start - t_end) * restricted, xi, np.minimum(t_max, cut), beta2, rng)
        theta0 = _highland(np.maximum(p_mid, 1e-3), np.sqrt(beta2), step_len, clip=0.3)
        starts, dirs = _walk(tr["pos"], tr["dir"], n_steps, step_len, theta0, rng)
        times = tr["time"][track] + _segment_offsets(step_len / (np.sqrt(beta2) * C_MM_PER_NS), n_steps)
        self._deposit_steps(record, starts, dirs, step_len, energy, times, cluster[track],
                            tr["interaction"][track])

        # delta rays: Poisson count per step, 1/T^2 spectrum between the cut and T_max
        n_delta = np.zeros(track.size, np.int64)
        n_delta[has_deltas] = rng.poisson(xi[has_deltas] * (1 / cut - 1 / t_max[has_deltas]))
        step = np.repeat(np.arange(track.size), n_delta)
        delta_t = 1 / (1 / cut - rng.random(step.size) * (1 / cut - 1 / t_max[step]))
        along = rng.random(step.size) * step_len[step]
        p_delta = np.sqrt(delta_t**2 + 2 * delta_t * M_E)
        cos_delta = delta_t / p_delta * (t_mid[step] + m[step] + M_E) / np.maximum(p_mid[step], 1e-9)
        delta_pos = starts[step] + dirs[step] * along[:, None]
        delta_group = record.new_groups(step.size)
        delta_cluster = record.add_clusters(delta_group, tr["interaction"][track[step]], SEM_DELTA, PID_ELECTRON,
                                            M_E, p_delta, delta_pos)
        deltas = self._electrons(delta_t, delta_pos, _deflect(dirs[step], cos_delta, rng),
                                 times[step], delta_cluster, delta_group,
                                 tr["interaction"][track[step]], SEM_DELTA)

        last = np.cumsum(n_steps) - 1
        end_pos = starts[last] + dirs[last] * step_len[last, None]
        end_time = times[last] + step_len[last] / (np.sqrt(beta2[last]) * C_MM_PER_NS)
        stopped = ends_inside & ~interacts
        michels = self._muon_decays(record, _take(tr, stopped & (tr["pid"] == PID_MUON)),
                                    end_pos[stopped & (tr["pid"] == PID_MUON)],
                                    end_time[stopped & (tr["pid"] == PID_MUON)])
        secondaries = self._pion_ends(record, tr, end_pos, end_time, dirs[last], stopped,
                                      ends_inside & interacts, _kinetic_from_range(full_range - path, mass))
        return secondaries, _concat([deltas, michels])

    def _deposit_steps(self, record, starts, dirs, step_len, energy, times, cluster, interaction):
        """Split each step into ``substeps`` deposits along it (dx is the path length)."""
        k = self.config.substeps
        frac = (np.arange(k) + 0.5) / k
        pos = (starts[:, None, :] + dirs[:, None, :] * (step_len[:, None] * frac)[:, :, None]).reshape(-1, 3)
        rep = lambda a: np.repeat(a, k)  # noqa: E731
        record.deposit(pos, rep(energy / k), rep(step_len / k), rep(times),
                       rep(cluster), rep(interaction))

    def _electrons(self, energy, pos, direction, time, cluster, group, interaction, semantic):
        n = len(energy)
        return dict(photon=np.zeros(n, bool), energy=energy, pos=pos, dir=direction, time=time,
                    origin=pos.copy(), cluster=cluster, group=group, interaction=interaction,
                    semantic=np.full(n, semantic), pid=np.full(n, PID_ELECTRON))

    def _muon_decays(self, record, mu, pos, time):
        """Michel electrons of stopped muons: all mu+, the mu- that escape nuclear capture."""
        rng = self.rng
        decays = (mu["charge"] > 0) | (rng.random(len(pos)) >= self.config.mu_minus_capture_probability)
        pos, time = pos[decays], time[decays]
        lifetime = np.where(mu["charge"][decays] > 0, MUON_LIFETIME_NS, MU_MINUS_ARGON_LIFETIME_NS)
        n = len(pos)
        x = _rejection(n, lambda i: rng.random(i.size), lambda x, i: x**2 * (3 - 2 * x), rng)
        energy = np.maximum(x * MICHEL_MAX_ENERGY - M_E, 0.01)
        group = record.new_groups(n)
        interaction = mu["interaction"][decays]
        cluster = record.add_clusters(group, interaction, SEM_MICHEL, PID_ELECTRON, M_E,
                                      np.sqrt(energy**2 + 2 * energy * M_E), pos)
        return self._electrons(energy, pos, _isotropic(n, rng), time + rng.exponential(lifetime),
                               cluster, group, interaction, SEM_MICHEL)

    def _pion_ends(self, record, tr, end_pos, end_time, end_dir, stopped, interacted, ke_at_end):
        """Secondary tracks: pi+ at rest -> mu+, pi- at rest -> protons, pions in flight
        -> a forward pion or proton plus up to two more hadrons sharing part of the energy."""
        rng = self.rng
        pion = tr["pid"] == PID_PION
        parts = []
        decay = np.flatnonzero(pion & stopped & (tr["charge"] > 0))
        parts.append((decay, np.full(decay.size, PID_MUON), np.full(decay.size, PI_PLUS_DECAY_MUON_KE),
                      _isotropic(decay.size, rng)))
        absorbed = np.flatnonzero(pion & stopped & (tr["charge"] < 0))
        parent = np.repeat(absorbed, rng.integers(0, 3, absorbed.size))
        parts.append((parent, np.full(parent.size, PID_PROTON), 5 + rng.exponential(25, parent.size),
                      _isotropic(parent.size, rng)))
        inflight = np.flatnonzero(pion & interacted)
        n_sec = rng.integers(1, 4, inflight.size)
        parent = np.repeat(inflight, n_sec)
        rank = np.arange(parent.size) - np.repeat(np.cumsum(n_sec) - n_sec, n_sec)
        share = rng.exponential(1.0, parent.size)
        share /= np.bincount(np.searchsorted(inflight, parent), share)[np.searchsorted(inflight, parent)]
        visible = rng.uniform(0.3, 0.8, parent.size)
        kind = np.where(rng.random(parent.size) < np.where(rank == 0, 0.5, 0.2), PID_PION, PID_PROTON)
        cos_t = np.where(rank == 0, rng.uniform(0.5, 1, parent.size), rng.uniform(-1, 1, parent.size))
        parts.append((parent, kind, ke_at_end[parent] * visible * share,
                      _deflect(end_dir[parent], cos_t, rng)))

        parent = np.concatenate([p[0] for p in parts])
        if parent.size == 0:
            return None
        pid = np.concatenate([p[1] for p in parts])
        mass = np.where(pid == PID_PROTON, M_P, np.where(pid == PID_PION, M_PI, M_MU))
        charge = np.where(pid == PID_PROTON, 1, tr["charge"][parent])
        return dict(pid=pid, mass=mass, charge=charge, ke=np.concatenate([p[2] for p in parts]),
                    pos=end_pos[parent], dir=np.concatenate([p[3] for p in parts]), time=end_time[parent],
                    interaction=tr["interaction"][parent], group=record.new_groups(parent.size))

    # -- EM cascade ---------------------------------------------------------------------

    def _cascade(self, record, em):
        """Develop photons and electrons generation by generation until all energy is deposited.

        Photons below the low-energy threshold can only make low-energy deposits; they are set
        aside and followed at the end by the cheaper :meth:`_low_energy_photons`."""
        soft = []
        while em is not None:
            photon = em["photon"]
            low = photon & (em["energy"] < self.config.low_energy_threshold)
            hard = photon & ~low
            soft.append(_take(em, low))
            em = _concat([self._interact_photons(record, _take(em, hard)) if hard.any() else None,
                          self._move_electrons(record, _take(em, ~photon)) if (~photon).any() else None])
        soft = _concat(soft)
        if soft is not None:
            self._low_energy_photons(record, soft)

    def _low_energy_photons(self, record, ph):
        """Compton chains of soft photons until absorption, all in the low-energy cluster.

        Pair production (below 2 MeV a percent effect) is neglected; the recoil electrons,
        shorter than a centimetre, deposit along straight lines in 1 mm pieces."""
        cfg, rng = self.config, self.rng
        keys = ("pos", "dir", "energy", "time", "interaction")
        pos, direction, energy, time, interaction = (ph[k] for k in keys)
        while energy.size:
            distance = rng.exponential(1.0 / photon_attenuation(energy)[0])
            pos = pos + direction * distance[:, None]
            time = time + distance / C_MM_PER_NS
            keep = _inside(pos, cfg.box_mm)
            pos, direction, energy, time, interaction = (
                a[keep] for a in (pos, direction, energy, time, interaction))
            absorbed = energy < cfg.photon_absorb_energy
            scattered, scattered_dir, recoil = _compton(energy[~absorbed], direction[~absorbed], rng)
            e_energy = energy.copy()
            e_energy[~absorbed] -= scattered
            e_dir = np.empty_like(direction)
            e_dir[absorbed] = _isotropic(absorbed.sum(), rng)
            e_dir[~absorbed] = recoil
            length = e_energy / LAR_ELECTRON_DEDX
            pieces = np.maximum(np.ceil(length).astype(np.int64), 1)
            owner = np.repeat(np.arange(energy.size), pieces)
            along = (_segment_offsets(np.ones(owner.size), pieces) + 0.5) * (length / pieces)[owner]
            record.deposit(pos[owner] + e_dir[owner] * along[:, None], (e_energy / pieces)[owner],
                           (length / pieces)[owner], time[owner], np.zeros(owner.size), interaction[owner])
            pos, direction, energy = pos[~absorbed], scattered_dir, scattered
            time, interaction = time[~absorbed], interaction[~absorbed]

    def _interact_photons(self, record, ph):
        """Move photons to their next interaction; return the electrons and scattered photons."""
        cfg, rng = self.config, self.rng
        compton_mu, pair_mu = photon_attenuation(ph["energy"])
        distance = rng.exponential(1.0 / (compton_mu + pair_mu))
        ph["pos"] = ph["pos"] + ph["dir"] * distance[:, None]
        ph["time"] = ph["time"] + distance / C_MM_PER_NS
        keep = _inside(ph["pos"], cfg.box_mm)
        ph, compton_mu, pair_mu = _take(ph, keep), compton_mu[keep], pair_mu[keep]
        n = len(ph["energy"])
        if n == 0:
            return None
        energy, direction = ph["energy"], ph["dir"]
        pair = rng.random(n) * (compton_mu + pair_mu) < pair_mu
        compton = ~pair
        scattered_energy, scattered_dir, recoil = _compton(energy[compton], direction[compton], rng)

        # pair production: Bethe-Heitler sharing u with weight 1 - 4/3 u(1-u)
        pairs = np.flatnonzero(pair)
        u = _rejection(pairs.size, lambda i: rng.random(i.size), lambda u, i: 1 - 4 / 3 * u * (1 - u), rng)
        available = energy[pair] - 2 * M_E
        pair_t = np.concatenate([u * available, (1 - u) * available])
        opening = np.cos(M_E / (pair_t + M_E))  # typical angle m_e / E of each lepton

        source = np.concatenate([np.flatnonzero(compton), pairs, pairs])
        e_energy = np.concatenate([energy[compton] - scattered_energy, pair_t])
        e_dir = np.concatenate([recoil,
                                _deflect(direction[np.tile(pairs, 2)], opening, rng)])

        # each interaction depositing enough starts a new fragment; small ones are low-energy
        visible = np.bincount(source, e_energy, minlength=n)
        fragment = visible >= cfg.low_energy_threshold
        frag_idx = np.flatnonzero(fragment)
        cluster = np.zeros(n, np.int64)
        cluster[frag_idx] = record.add_clusters(ph["group"][frag_idx], ph["interaction"][frag_idx],
                                                ph["semantic"][frag_idx], ph["pid"][frag_idx], 0.0,
                                                energy[frag_idx], ph["origin"][frag_idx])
        electrons = dict(photon=np.zeros(source.size, bool), energy=e_energy, pos=ph["pos"][source],
                         dir=e_dir, time=ph["time"][source], origin=ph["pos"][source],
                         cluster=cluster[source])
        for key in ("group", "interaction", "semantic", "pid"):
            electrons[key] = ph[key][source]
        survivors = _take(ph, compton)
        survivors.update(energy=scattered_energy, dir=scattered_dir, origin=survivors["pos"])
        # the positron annihilates into two back-to-back 511 keV photons (placed at the
        # conversion point: its range is short next to their 12 cm mean free path)
        annihilation = _take(ph, np.concatenate([pairs, pairs]))
        back_to_back = _isotropic(pairs.size, rng)
        annihilation.update(energy=np.full(2 * pairs.size, M_E), dir=np.concatenate([back_to_back, -back_to_back]))
        return _concat([electrons, survivors, annihilation])

    def _move_electrons(self, record, el):
        """Deposit electrons' energy along scattering tracks and radiate bremsstrahlung.

        Below the critical energy an electron deposits all it has over its range; above it
        it moves one X0/2 segment, emitting a Poisson number of photons above the cut from
        the spectrum (4/3 - 4/3 y + y^2)/y, and goes on to the next generation.
        """
        cfg, rng = self.config, self.rng
        el = _take(el, _inside(el["pos"], cfg.box_mm) & (el["energy"] > 0))
        n = len(el["energy"])
        if n == 0:
            return None
        energy = el["energy"]
        stub = energy <= LAR_CRITICAL_ENERGY
        seg_len = cfg.brem_segment_x0 * LAR_RADIATION_LENGTH_MM
        x0_frac = seg_len / LAR_RADIATION_LENGTH_MM

        radiating = np.flatnonzero(~stub)
        y_min = cfg.brem_photon_cut / energy[radiating]
        rate = 4 / 3 * (-np.log(y_min) - (1 - y_min)) + (1 - y_min**2) / 2
        n_brem = rng.poisson(rate * x0_frac)
        emitter = np.repeat(np.arange(radiating.size), n_brem)
        y = _rejection(emitter.size, lambda i: y_min[emitter[i]] ** rng.random(i.size),
                       lambda y, i: 1 - y + 0.75 * y**2, rng)
        where = rng.random(emitter.size)  # emission point, as a fraction of the segment
        order = np.lexsort((where, emitter))
        y, where, emitter = y[order], where[order], emitter[order]
        log_keep = np.log1p(-np.minimum(y, 1 - 1e-12))
        before = np.exp(_segment_offsets(log_keep, n_brem))
        photon_energy = y * before * energy[radiating][emitter]
        radiated = np.bincount(emitter, photon_energy, minlength=radiating.size)
        soft = 4 / 3 * cfg.brem_photon_cut * x0_frac  # photons below the cut, deposited locally
        ionisation = np.minimum(LAR_ELECTRON_DEDX * seg_len + soft, energy[radiating] - radiated)
        remaining = energy[radiating] - radiated - ionisation

        length = np.where(stub, energy / LAR_ELECTRON_DEDX, seg_len)
        deposit_total = energy.copy()
        deposit_total[radiating] = ionisation
        n_steps = np.maximum(np.ceil(length / cfg.step_mm).astype(np.int64), 1)
        track = np.repeat(np.arange(n), n_steps)
        travelled = _segment_offsets(np.full(track.size, cfg.step_mm), n_steps)
        step_len = np.minimum(cfg.step_mm, length[track] - travelled)
        kinetic = np.where(stub[track], np.maximum(energy[track] - LAR_ELECTRON_DEDX * (travelled + step_len / 2),
                                                   0.02), energy[track])
        gamma = 1 + kinetic / M_E
        beta2 = 1 - 1 / gamma**2
        momentum = np.sqrt(kinetic**2 + 2 * kinetic * M_E)
        theta0 = _highland(momentum, np.sqrt(beta2), step_len, clip=1.0)
        starts, dirs = _walk(el["pos"], el["dir"], n_steps, step_len, theta0, rng)
        mean = deposit_total[track] * step_len / length[track]
        fluctuated = _landau_like(mean, _XI_PER_MM * step_len / beta2,
                                  np.minimum(cfg.delta_ray_threshold, kinetic / 2), beta2, rng)
        scale = deposit_total / np.maximum(np.bincount(track, fluctuated, minlength=n), 1e-12)
        times = el["time"][track] + _segment_offsets(step_len / C_MM_PER_NS, n_steps)
        self._deposit_steps(record, starts, dirs, step_len, fluctuated * scale[track], times,
                            el["cluster"][track], el["interaction"][track])

        # bremsstrahlung photons leave from their emission point along the electron
        first = np.cumsum(n_steps) - n_steps
        owner = radiating[emitter]
        distance = where * seg_len
        step_of = first[owner] + np.minimum((distance // cfg.step_mm).astype(np.int64), n_steps[owner] - 1)
        photon_pos = starts[step_of] + dirs[step_of] * (distance - travelled[step_of])[:, None]
        photons = dict(photon=np.ones(owner.size, bool), energy=photon_energy, pos=photon_pos,
                       dir=_deflect(dirs[step_of], np.cos(M_E / energy[owner]), rng),
                       time=times[step_of] + (distance - travelled[step_of]) / C_MM_PER_NS,
                       origin=photon_pos.copy(), cluster=np.full(owner.size, -1))
        for key in ("group", "interaction", "semantic", "pid"):
            photons[key] = el[key][owner]

        last = first + n_steps - 1
        going_on = radiating[remaining > 0]
        survivors = _take(el, going_on)
        survivors.update(energy=remaining[remaining > 0],
                         pos=starts[last[going_on]] + dirs[last[going_on]] * step_len[last[going_on], None],
                         dir=dirs[last[going_on]],
                         time=times[last[going_on]] + step_len[last[going_on]] / C_MM_PER_NS)
        return _concat([photons, survivors])

    # -- voxels and the final event ---------------------------------------------------

    def _voxel_keys(self, deposits):
        """Deposits inside the box and their (cluster, voxel) key, cluster-major."""
        nv = self.config.box_voxels
        ijk = np.floor(deposits[:, :3] / self.config.voxel_mm).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < nv), axis=1)
        ijk = ijk[inside]
        cluster = deposits[inside, 6].astype(np.int64)
        return deposits[inside], ((cluster * nv + ijk[:, 0]) * nv + ijk[:, 1]) * nv + ijk[:, 2]

    def _voxelize(self, deposits):
        """Sum deposits per (cluster, voxel): points (k, 8) and their cluster index, sorted.

        Time is the earliest arrival in the voxel, dx the summed path length, n_electrons the
        charge surviving recombination (modified box model on each deposit's dE/dx)."""
        cfg = self.config
        nv = cfg.box_voxels
        deposits, key = self._voxel_keys(deposits)
        if key.size == 0:
            return np.empty((0, 8)), np.empty(0, np.int64)
        energy, dx, time = deposits[:, 3], deposits[:, 4], deposits[:, 5]
        dedx = np.clip(energy / np.maximum(dx, 1e-3) * 10, LAR_ELECTRON_DEDX * 10 / 2, 1e3)  # MeV/cm
        xi = cfg.box_beta * dedx / (LAR_DENSITY * cfg.electric_field)
        charge = energy * np.minimum(np.log(cfg.box_alpha + xi) / xi, 1.0) / cfg.ionisation_energy
        order = np.lexsort((time, key))
        key = key[order]
        start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        sums = np.add.reduceat(np.column_stack([energy, dx, charge])[order], start, axis=0)
        voxel = key[start]
        points = np.empty((start.size, 8))
        points[:, 2] = voxel % nv
        points[:, 1] = (voxel // nv) % nv
        points[:, 0] = (voxel // nv**2) % nv
        points[:, 3] = sums[:, 0]
        noise = np.sqrt(sums[:, 2] + cfg.charge_noise_electrons**2)  # Poisson and readout
        measured = sums[:, 2] + self.rng.normal(size=start.size) * noise
        points[:, 4] = np.maximum(measured, 0) * cfg.ionisation_energy / self._mip_recombination
        points[:, 5] = time[order][start]
        points[:, 6] = sums[:, 2]
        points[:, 7] = sums[:, 1]
        return points, voxel // nv**3

    def _blips(self, anchors, times, n_points):
        """Small isolated deposits (1-4 voxels) scattered around existing activity."""
        cfg, rng = self.config, self.rng
        n_blips = rng.poisson(n_points / 1.6)
        pick = rng.integers(0, len(anchors), n_blips)
        distance = rng.exponential(cfg.blip_distance_mm, n_blips)[:, None]
        centre = anchors[pick] + _isotropic(n_blips, rng) * distance
        size = np.minimum(1 + rng.poisson(0.7, n_blips), 4)
        blip = np.repeat(np.arange(n_blips), size)
        pos = centre[blip] + _segment_offsets(_isotropic(blip.size, rng) * 1.5, size)
        energy = (0.05 + rng.exponential(0.3, n_blips))[blip] / size[blip]
        time = (times[pick] + rng.exponential(1000.0, n_blips))[blip]
        return np.column_stack([pos, energy, np.ones(blip.size), time, np.zeros(blip.size),
                                np.full(blip.size, -1)])

    def _finish(self, record, primaries, blips=True):
        """Voxelise the deposits of the kept interactions, add blips, renumber ids and build
        the LArEvent (None if nothing was deposited inside the box)."""
        cfg = self.config
        deposits = np.concatenate(record.deposits) if record.deposits else np.empty((0, 8))
        deposits = deposits[np.isin(deposits[:, 7], primaries[:, 0])]
        low = deposits[:, 6] == 0
        main_points, main_cluster = self._voxelize(deposits[~low])
        low_points = self._voxelize(deposits[low])[0]
        if blips and cfg.low_energy_blip_fraction > 0 and len(main_points):
            share = cfg.low_energy_blip_fraction
            wanted = share / (1 - share) * (len(main_points) + len(low_points))
            anchors = (main_points[:, :3] + 0.5) * cfg.voxel_mm
            extra = self._blips(anchors, main_points[:, 5], wanted)
            low_points = self._voxelize(np.concatenate([deposits[low], extra]))[0]
        if len(main_points) + len(low_points) == 0:
            return None

        rows = np.concatenate(record.rows)
        sizes = np.bincount(main_cluster, minlength=len(rows))
        sizes[0] = len(low_points)
        kept = np.flatnonzero(sizes > 0)
        kept = kept[kept > 0]
        groups = rows[kept, 0].astype(np.int64)
        group_ids, group_new = np.unique(groups, return_inverse=True)
        inter_ids, inter_new = np.unique(rows[kept, 1].astype(np.int64), return_inverse=True)
        clusters = np.empty((len(kept) + 1, 6))
        clusters[0] = [len(low_points), -1, -1, -1, SEM_LOW_ENERGY, PID_LOW_ENERGY]
        clusters[1:, 0] = sizes[kept]
        clusters[1:, 1] = np.arange(len(kept))
        clusters[1:, 2] = group_new
        clusters[1:, 3] = inter_new
        clusters[1:, 4:6] = rows[kept, 2:4]
        extra = np.empty((len(kept) + 1, 5))
        extra[0] = [0, 0, -1, -1, -1]
        extra[1:, :2] = rows[kept, 4:6]
        extra[1:, 2:] = rows[kept, 6:9] / cfg.voxel_mm

        primaries = primaries.copy()
        primaries[:, -1] = _renumber(primaries[:, -1], group_ids)
        primaries[:, 0] = _renumber(primaries[:, 0], inter_ids)
        points = np.concatenate([low_points, main_points]).astype(np.float32)
        meta = dict(generator="pcfm.sim.lartpc", primaries=primaries,
                    primaries_columns=("interaction", "pdg", "kinetic_energy", "vertex_x", "vertex_y",
                                       "vertex_z", "dir_x", "dir_y", "dir_z", "group"))
        return LArEvent(points, clusters.astype(np.int64), extra.astype(np.float32), meta)


# --- convenience functions ---------------------------------------------------------------

def _simulator(seed, rng, config, particles_per_event):
    config = config or LArTPCConfig()
    if particles_per_event is not None:
        config = replace(config, particles_per_event=tuple(particles_per_event))
    return LArTPCSimulator(config, seed=seed, rng=rng)


def simulate_lartpc_event(*, seed=None, particles_per_event=None, target_points=None,
                          rng: Optional[np.random.Generator] = None,
                          config: Optional[LArTPCConfig] = None) -> LArEvent:
    """One simulated LArTPC event in the PILArNet-M v2 layout (see :func:`simulate_lartpc_events`)."""
    return _simulator(seed, rng, config, particles_per_event).event(target_points)


def simulate_lartpc_events(n_events: int, *, seed=None, particles_per_event=None, target_points=None,
                           rng: Optional[np.random.Generator] = None,
                           config: Optional[LArTPCConfig] = None) -> list[LArEvent]:
    """``n_events`` simulated LArTPC events in the PILArNet-M v2 layout.

    ``particles_per_event`` is the inclusive (lo, hi) range of primaries from interaction
    vertices (None: the config's, by default (1, 5)); ``target_points=(lo, hi)`` instead grows
    each event to roughly that many points. ``seed`` or ``rng`` make the run reproducible.
    """
    return _simulator(seed, rng, config, particles_per_event).events(n_events, target_points)
