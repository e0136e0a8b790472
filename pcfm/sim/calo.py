"""Fast, vectorised, physics-based calorimeter shower simulator for any cylindrical geometry.

pcfm ships no shower data set, so these showers are the library's default data: they must
look like Geant4 showers to the eye and to physics tests, and come fast (thousands per second
on one CPU core). Electrons and photons follow the Grindhammer & Peters parameterisation
(hep-ex/0001020, see :mod:`pcfm.sim.calo_em`), charged pions a MIP track plus an EM and a
hadronic part (see :mod:`pcfm.sim.calo_hadronic`).

How a shower is built:

1. Depth. Every layer is cut into a few substeps (about one X0 or a quarter lambda_I each).
   Depth in material is counted along the shower axis through the cumulative per-layer X0
   (lambda_I for hadrons), so mixed materials work and gaps hold no material. Photons start
   showering after an exponential depth of mean 9/7 X0, pions interact after an exponential
   depth of mean one lambda_I (a MIP track before that, lost energy dE/dx of the layer
   materials, read through the EM calibration: its stored energy is the loss divided by e/mip).
   The energy of each substep is the exact integral of the shower's Gamma profile, a
   difference of regularised incomplete gamma functions, with per-shower correlated
   fluctuations of ln T and ln alpha.
2. Transverse spread. Each substep's energy spreads with the paper's core + tail profile
   (radii from depth tau and ln E, in the local Moliere radius; pions' hadronic part with a
   core + halo in the local lambda_I) around the shower axis, which runs along
   (cos theta, 0, sin theta) in (x, y, z), so that oblique showers drift in x with depth. The
   mean energy in each cell is integrated in closed form: the profile 2r R^2 / (r^2 + R^2)^2
   is the stereographic image of a uniform sphere, so the share inside any disk, centred or
   not, is a spherical-cap area, and its azimuthal share at a given radius is Kepler's
   equation (mean versus true anomaly).
3. Fluctuations. GFlash carries energy in spots; here the spots are integrated out (an
   infinite-spot mean), and their fluctuations put back per cell. A cell of mean mu draws
   a Gamma law of variance mu (a^2 GeV + E/N_spot): the sampling term a / sqrt(E/GeV) of the
   layer plus the paper's spot-count term. Low-energy cells are thus noisier, and cells far
   out are mostly empty with a rare hit. The shower's total is then rescaled to a separate
   draw that holds only the sampling term, since spots move energy without changing the sum.
   Finally the readout threshold zeroes small cells. Energy outside the mesh (outer radius,
   behind the last layer) is lost, as in real data.

Why not sample a capped number of spots: at 1 TeV a few thousand spots of hundreds of MeV
each make the core cells several times noisier than the physical fluctuations, and leave
most outer cells empty where Geant4 fills them; the closed-form mean has neither problem and
costs less.

Approximations (documented choices): a shower's longitudinal parameters come from the layer
where its maximum is expected; the transverse profile of an oblique shower is taken in the
layer plane with an isotropic radius R / sqrt(sin theta) (the exact projection is an ellipse
stretched by 1 / sin theta along x), and its depth does not shift with the transverse offset;
within a radial bin, the azimuthal share of an oblique shower is evaluated at
``angular_nodes_per_ring`` radii; cells whose Gamma shape is below 0.1 (a mean under a
tenth of the fluctuation scale) draw a single-hit (compound Poisson) law and the others a
Wilson-Hilferty normal, both with the Gamma law's mean and variance.

Why one module of this length: one simulator, read top to bottom in the order a shower is
built; the EM and hadronic profiles have their own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from pcfm.data.events import ELECTRON, PHOTON, PION, CaloShowers
from pcfm.data.calochallenge import MAX_ENERGY_MEV
from pcfm.errors import ArgumentError, GeometryError
from pcfm.geometry import get as get_geometry
from pcfm.geometry.base import Geometry
from pcfm.geometry.cylindrical import CylindricalGeometry
from pcfm.sim.calo_em import layer_physics, longitudinal_parameters, radial_parameters, spot_energy
from pcfm.sim.calo_hadronic import em_fraction, hadronic_shape, visible_hadronic_fraction

#: Particle names and the PDG codes they stand for; the sign (charge) does not change the shower.
PARTICLE_ALIASES = {"electron": 11, "e-": 11, "positron": -11, "e+": -11, "photon": 22, "gamma": 22,
                    "pion": 211, "pi+": 211, "pi-": -211}
SUPPORTED_PDG = (11, -11, 22, 211, -211)


@dataclass(frozen=True)
class SimulatorConfig:
    """Knobs of :class:`ShowerSimulator`; the defaults are the physics described in the module.

    Depth stepping:
        substep_x0, substep_lambda: largest substep, in X0 and in lambda_I.
        max_substeps_per_layer: cap for thick layers.
        angular_nodes_per_ring: radii per radial bin at which an oblique shower's azimuthal
            share is evaluated.
    Electromagnetic showers:
        photon_conversion_x0: mean conversion depth of photons (9/7 X0).
        em_stochastic_coefficient: c in the sampling term a = c sqrt(d_eq / f_mip).
        homogeneous_stochastic_term: a of a fully active layer.
        local_fluctuation_scale: multiplies the spot energy E / N_spot (the paper's spot count
            N_spot = 10.3 / a E^0.959 in sampling calorimeters): 0 turns the local
            fluctuations off, 2 doubles their variance.
    Pions:
        had_stochastic_coefficient: c in the hadronic sampling term c sqrt(Delta E_mip / MeV).
        had_local_fluctuation_scale: local fluctuations of the hadronic part, in units of an
            EM shower's of the same energy (hadronic showers are clumpier).
        em_fraction_e0_mev, em_fraction_k, em_fraction_concentration: <f_em> = 1 - (E/E0)^(k-1)
            and the Beta law's concentration (larger: smaller spread).
        h_over_e, h_over_e_sigma: visible share of the hadronic energy, and its spread.
        had_shape_sigma: log-normal spread of the hadronic profile's shape parameter.
        had_core_radius_lambda, had_halo_radius_lambda, had_core_fraction: the hadronic
            radial profile, in local lambda_I.
        mip_radius_mm: transverse spread of the MIP track (delta rays).
    Sampling and memory:
        single_hit_below: cells whose Gamma shape (mean^2 / variance) is below this draw a
            single-hit law instead (see ``_fluctuate``).
        chunk_size, max_chunk_bytes: showers per vectorised batch, and a bound on its working
            memory (small batches stay in cache and beat large ones).
    """

    substep_x0: float = 1.0
    substep_lambda: float = 0.25
    max_substeps_per_layer: int = 16
    angular_nodes_per_ring: int = 2
    photon_conversion_x0: float = 9.0 / 7.0
    em_stochastic_coefficient: float = 0.027
    homogeneous_stochastic_term: float = 0.02
    local_fluctuation_scale: float = 1.0
    had_stochastic_coefficient: float = 0.115
    had_local_fluctuation_scale: float = 4.0
    em_fraction_e0_mev: float = 1000.0
    em_fraction_k: float = 0.82
    em_fraction_concentration: float = 10.0
    h_over_e: float = 0.65
    h_over_e_sigma: float = 0.07
    had_shape_sigma: float = 0.2
    had_core_radius_lambda: float = 0.1
    had_halo_radius_lambda: float = 0.35
    had_core_fraction: float = 0.55
    mip_radius_mm: float = 1.0
    single_hit_below: float = 0.1
    chunk_size: int = 1000
    max_chunk_bytes: int = 32 * 2**20


@dataclass
class _Component:
    """Energy (MeV, calibrated) per substep spread with one transverse kernel, arrays (n, S)."""

    energy: np.ndarray
    radius_mm: np.ndarray
    sampling_scale: np.ndarray  # a^2 GeV: variance per MeV from sampling fluctuations
    local_scale: np.ndarray  # spot energy: variance per MeV from local (spot) fluctuations


@dataclass(frozen=True)
class _LayerRun:
    """Consecutive layers with the same binning and substep count: one contiguous block of cells."""

    first_cell: int
    n_layers: int
    n_alpha: int
    r_edges: np.ndarray
    substeps: slice  # into the global substep arrays
    per_layer: int  # substeps per layer


def _gammainc(shape: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularised lower incomplete gamma P(shape, x), elementwise with broadcasting."""
    shape, x = np.broadcast_arrays(np.asarray(shape, dtype=np.float64), np.asarray(x, dtype=np.float64))
    return torch.special.gammainc(torch.from_numpy(np.ascontiguousarray(shape)),
                                  torch.from_numpy(np.ascontiguousarray(x))).numpy()


def disk_share(radius: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Share of the profile 2r R^2 / (r^2 + R^2)^2, centred at distance ``centre`` from the
    mesh axis, inside the disk of ``radius`` around the axis (broadcasting).

    The profile is the stereographic projection of a uniform sphere, disks map to spherical
    caps, and a cap at height h holds (1 + h) / 2 of the sphere.
    """
    r2, c2, s2 = radius**2, centre**2, scale**2
    height = (r2 - c2 - s2) / np.sqrt(4 * c2 * s2 + (s2 + r2 - c2) ** 2)
    return 0.5 * (1.0 + height)


def azimuthal_cdf(alpha: np.ndarray, eccentricity: np.ndarray) -> np.ndarray:
    """Share of the profile on a circle around the axis with azimuth below ``alpha`` in [-pi, pi].

    On a circle of radius r, a profile centred at (c, 0) has density ~ (1 - e cos alpha)^-2
    with e = 2 r c / (r^2 + c^2 + R^2): Kepler's second law for an orbit of eccentricity -e, so
    the cumulative share is the mean anomaly M = E + e sin E of the eccentric anomaly E.
    """
    e = np.clip(eccentricity, -1 + 1e-12, 1 - 1e-12)
    y, x = np.sqrt(1 + e) * np.sin(alpha / 2), np.sqrt(1 - e) * np.cos(alpha / 2)
    anomaly = 2 * np.arctan2(y, x)
    mean_anomaly = anomaly + e * (2 * x * y / (x * x + y * y))
    return (mean_anomaly + np.pi) / (2 * np.pi)


class ShowerSimulator:
    """Simulates showers on one cylindrical geometry; see the module docstring for the physics.

    Args:
        geometry: a :class:`~pcfm.geometry.CylindricalGeometry` or a name :func:`pcfm.geometry.get` knows.
        config: the physics and batching knobs (:class:`SimulatorConfig`).
    """

    def __init__(self, geometry: Union[str, Geometry], config: Optional[SimulatorConfig] = None):
        geometry = get_geometry(geometry)
        if not isinstance(geometry, CylindricalGeometry):
            raise GeometryError(
                f"geometry {geometry.name!r} is a {geometry.kind} geometry; the shower simulator needs a "
                f"cylindrical calorimeter geometry (kind 'calorimeter')")
        self.geometry = geometry
        self.config = config or SimulatorConfig()
        c = self.config
        self.physics = layer_physics(geometry, c.em_stochastic_coefficient, c.homogeneous_stochastic_term,
                                     c.had_stochastic_coefficient)
        self._build_substeps()
        # stored energy per calibrated MeV: 1, or the EM sampling fraction e/mip * f_mip
        visible = np.array([l.structure.mip_sampling_fraction for l in geometry.layers]) * self.physics.e_hat
        self._response = None if geometry.energy_response == "calibrated" else \
            np.repeat(visible, np.diff(geometry.layer_offsets)).astype(np.float32)

    # -- geometry bookkeeping ------------------------------------------------------------------
    def _build_substeps(self) -> None:
        g, c = self.geometry, self.config
        x0_edges, lam_edges = g.layer_x0(), g.layer_lambda()
        x0_depth, lam_depth = np.diff(x0_edges), np.diff(lam_edges)
        needed = np.maximum(np.ceil(x0_depth / c.substep_x0), np.ceil(lam_depth / c.substep_lambda))
        needed = np.clip(needed, 1, c.max_substeps_per_layer).astype(int)
        runs, start = [], 0  # runs of consecutive layers with the same binning
        for i in range(1, g.n_layers):
            first, layer = g.layers[start], g.layers[i]
            if layer.n_alpha != first.n_alpha or not np.array_equal(layer.r_edges_mm, first.r_edges_mm):
                runs.append((start, i))
                start = i
        runs.append((start, g.n_layers))
        per_layer = np.empty(g.n_layers, dtype=int)
        for a, b in runs:
            per_layer[a:b] = needed[a:b].max()
        fraction = np.concatenate([(np.arange(m) + 0.5) / m for m in per_layer])
        lo_fraction = np.concatenate([np.arange(m) / m for m in per_layer])
        layer = np.repeat(np.arange(g.n_layers), per_layer)
        front = np.array([l.z_front_mm for l in g.layers])
        depth = np.array([l.depth_mm for l in g.layers])
        step = 1.0 / per_layer[layer]
        self._sub_layer = layer
        self._sub_z_mid = front[layer] + fraction * depth[layer]
        self._sub_depth_mm = depth[layer] * step
        self._x0_lo = x0_edges[layer] + lo_fraction * x0_depth[layer]
        self._x0_hi = self._x0_lo + step * x0_depth[layer]
        self._lam_lo = lam_edges[layer] + lo_fraction * lam_depth[layer]
        self._lam_hi = self._lam_lo + step * lam_depth[layer]
        self._x0_edges, self._lam_edges = x0_edges, lam_edges  # both linear in z within a layer
        sub_start = np.concatenate([[0], np.cumsum(per_layer)])
        self._runs = [
            _LayerRun(int(g.layer_offsets[a]), b - a, g.layers[a].n_alpha, np.asarray(g.layers[a].r_edges_mm, float),
                      slice(int(sub_start[a]), int(sub_start[b])), int(per_layer[a]))
            for a, b in runs
        ]

    def _layer_at_x0(self, depth_normal: np.ndarray) -> np.ndarray:
        """Layer holding each normal-incidence X0 depth (the last layer beyond the back)."""
        return np.minimum(np.searchsorted(self._x0_edges[1:], depth_normal, side="right"), self.geometry.n_layers - 1)

    # -- mean energies -------------------------------------------------------------------------
    def _em_components(self, energy: np.ndarray, start_x0: np.ndarray, sin_t: np.ndarray,
                       rng: np.random.Generator) -> list[_Component]:
        """An electron-like shower of ``energy`` starting ``start_x0`` radiation lengths along its axis."""
        p = self.physics
        first = self._layer_at_x0(start_x0 * sin_t)
        ln_y = np.log(np.maximum(energy / p.critical_mev[first], 1.0))
        ref = self._layer_at_x0((start_x0 + np.maximum(ln_y - 0.812, 0.0)) * sin_t)
        alpha, beta, mean_alpha = longitudinal_parameters(
            energy, p.critical_mev[ref], p.z_eff[ref], p.inv_fs[ref], p.e_hat[ref], p.homogeneous[ref], rng)
        axis = 1.0 / sin_t[:, None]
        t_lo = np.maximum(self._x0_lo * axis - start_x0[:, None], 0.0)
        t_hi = np.maximum(self._x0_hi * axis - start_x0[:, None], 0.0)
        a, b = alpha[:, None], beta[:, None]
        deposit = energy[:, None] * np.maximum(_gammainc(a, b * t_hi) - _gammainc(a, b * t_lo), 0.0)
        tau = 0.5 * (t_lo + t_hi) * (b / a) * (mean_alpha / (mean_alpha - 1.0))[:, None]
        layer = self._sub_layer
        energy_gev = np.maximum(energy, 1.0)[:, None] / 1000.0
        r_core, r_tail, p_core = radial_parameters(tau, energy_gev, p.z_eff[layer], p.inv_fs[layer], p.e_hat[layer])
        scale = p.moliere_mm[layer] * np.sqrt(axis)
        sampling = 1000.0 * p.stochastic_em[layer] ** 2
        local = self.config.local_fluctuation_scale * spot_energy(
            energy, p.stochastic_em[ref], p.z_eff[ref], p.homogeneous[ref])[:, None]
        return [_Component(deposit * p_core, r_core * scale, sampling, local),
                _Component(deposit * (1.0 - p_core), r_tail * scale, sampling, local)]

    def _pion_components(self, energy: np.ndarray, sin_t: np.ndarray, rng: np.random.Generator) -> list[_Component]:
        """MIP track to an exponential interaction point, then an EM and a hadronic part."""
        p, c, layer = self.physics, self.config, self._sub_layer
        axis = 1.0 / sin_t[:, None]
        interaction = rng.exponential(1.0, energy.shape[0])  # lambda_I along the axis
        lam_lo, lam_hi = self._lam_lo * axis, self._lam_hi * axis
        before = np.clip((interaction[:, None] - lam_lo) / (lam_hi - lam_lo), 0.0, 1.0)
        loss = p.dedx[layer] * self._sub_depth_mm * axis * before  # true MIP energy loss
        left = energy[:, None] - (np.cumsum(loss, axis=1) - loss)  # a slow pion ranges out
        loss = np.clip(left, 0.0, loss)
        shower_energy = np.maximum(energy - loss.sum(axis=1), 0.0)
        f_em = em_fraction(shower_energy, rng, c.em_fraction_e0_mev, c.em_fraction_k, c.em_fraction_concentration)
        visible_had = (1.0 - f_em) * shower_energy * visible_hadronic_fraction(
            energy.shape[0], rng, c.h_over_e, c.h_over_e_sigma)
        start_x0 = np.interp(interaction * sin_t, self._lam_edges, self._x0_edges) / sin_t
        components = self._em_components(f_em * shower_energy, start_x0, sin_t, rng)
        shape, rate = hadronic_shape(shower_energy, rng, c.had_shape_sigma)
        s_lo = np.maximum(lam_lo - interaction[:, None], 0.0)
        s_hi = np.maximum(lam_hi - interaction[:, None], 0.0)
        a, d = shape[:, None], rate[:, None]
        hadronic = visible_had[:, None] * np.maximum(_gammainc(a, d * s_hi) - _gammainc(a, d * s_lo), 0.0)
        lam_scale = p.lambda_mm[layer] * np.sqrt(axis)
        em_sampling = 1000.0 * p.stochastic_em[layer] ** 2
        had_local = c.had_local_fluctuation_scale * spot_energy(
            visible_had[:, None], p.stochastic_em[layer], p.z_eff[layer], p.homogeneous[layer])
        had_sampling = 1000.0 * p.stochastic_had[layer] ** 2
        zero = np.zeros(layer.shape)
        return components + [
            _Component(loss / p.e_hat[layer], c.mip_radius_mm * np.sqrt(axis) + zero, em_sampling, zero),
            _Component(hadronic * c.had_core_fraction, c.had_core_radius_lambda * lam_scale, had_sampling, had_local),
            _Component(hadronic * (1 - c.had_core_fraction), c.had_halo_radius_lambda * lam_scale, had_sampling,
                       had_local),
        ]

    def _deposit(self, components: Sequence[_Component], cot_t: np.ndarray) -> np.ndarray:
        """Mean cell energies and their two variance sums, (3, n, n_cells) float32."""
        n = cot_t.shape[0]
        out = np.zeros((3, n, self.geometry.n_cells), dtype=np.float32)
        weights = [np.stack(np.broadcast_arrays(comp.energy, comp.energy * comp.sampling_scale,
                                                comp.energy * comp.local_scale)) for comp in components]
        oblique = np.abs(cot_t) > 1e-9
        for rows, is_oblique in _row_sets(oblique):
            k = n if isinstance(rows, slice) else rows.size
            centre = self._sub_z_mid[None, :] * cot_t[rows, None]
            for run in self._runs:
                n_r, n_a, m = run.r_edges.size - 1, run.n_alpha, run.per_layer
                cells = slice(run.first_cell, run.first_cell + run.n_layers * n_a * n_r)
                block = out[:, rows, cells].reshape(3, k, run.n_layers, n_a, n_r)  # a view for slice rows
                if is_oblique:  # every cell of a layer differs
                    for comp, w in zip(components, weights):
                        shares = self._cell_shares(run, comp.radius_mm[rows, run.substeps], centre[:, run.substeps])
                        share = w[:, rows, run.substeps, None, None] * shares
                        block += share.reshape(3, k, run.n_layers, m, n_a, n_r).sum(axis=3)
                else:  # the cells of a ring share its energy equally
                    rings = np.zeros((3, k, run.n_layers, n_r))
                    for comp, w in zip(components, weights):
                        r2 = run.r_edges**2
                        inside = r2 / (r2 + comp.radius_mm[rows, run.substeps, None] ** 2)
                        share = w[:, rows, run.substeps, None] * np.diff(inside, axis=-1)
                        rings += share.reshape(3, k, run.n_layers, m, n_r).sum(axis=3)
                    block += (rings / n_a).astype(np.float32)[:, :, :, None, :]
                if not isinstance(rows, slice):
                    out[:, rows, cells] = block.reshape(3, k, -1)
        return out

    def _cell_shares(self, run: _LayerRun, radius: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Share of an off-axis profile in every (angular, radial) bin, (n, S, n_alpha, n_r)."""
        q = self.config.angular_nodes_per_ring
        width = np.diff(run.r_edges)
        edges = np.append((run.r_edges[:-1, None] + width[:, None] * np.arange(q) / q).ravel(), run.r_edges[-1])
        inside = disk_share(edges, centre[..., None], radius[..., None])
        rings = np.diff(inside, axis=-1).reshape(*radius.shape, -1, q)  # (n, S, n_r, q)
        if run.n_alpha == 1:
            return rings.sum(axis=-1)[..., None, :]
        mid = (0.5 * (edges[:-1] + edges[1:])).reshape(-1, q)
        c, s = centre[..., None, None], radius[..., None, None]
        eccentricity = (2 * mid * c / (mid**2 + c**2 + s**2)).astype(np.float32)
        alpha_edges = np.linspace(-np.pi, np.pi, run.n_alpha + 1, dtype=np.float32)
        azimuthal = np.diff(azimuthal_cdf(alpha_edges, eccentricity[..., None]), axis=-1)  # (n, S, n_r, q, n_a)
        shares = np.matmul(rings.astype(np.float32)[..., None, :], azimuthal)[..., 0, :]  # (n, S, n_r, n_a)
        return shares.swapaxes(-1, -2)

    def mean_energies(self, pdg: int, energy: np.ndarray, theta: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        """Per-cell means before the cell fluctuations, for showers of one particle.

        The per-shower fluctuations (profile parameters, conversion and interaction points, EM
        fraction) are drawn. Returns (3, n, n_cells) float32: the mean calibrated energy of each
        cell, then its variance from sampling fluctuations and from local (spot) fluctuations.
        """
        if abs(pdg) not in (ELECTRON, PHOTON, PION):
            raise ValueError(f"unsupported PDG code {pdg}; supported: {SUPPORTED_PDG}")
        sin_t, cot_t = np.sin(theta), np.cos(theta) / np.sin(theta)
        if abs(pdg) == PION:
            components = self._pion_components(energy, sin_t, rng)
        else:
            start = rng.exponential(self.config.photon_conversion_x0, energy.shape[0]) if pdg == PHOTON \
                else np.zeros(energy.shape[0])
            components = self._em_components(energy, start, sin_t, rng)
        return self._deposit(components, cot_t)

    # -- fluctuations --------------------------------------------------------------------------
    def _fluctuate(self, moments: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
        """Draw cell energies around their means into ``out``; the shower total keeps only the
        sampling spread.

        A cell of mean mu and variance v follows a Gamma law of shape k = mu^2 / v. Exact Gamma
        draws cost ~100 ns each, so: k < ``single_hit_below`` gives one hit of Exp(v / 2mu) with
        probability 2k (the same mean and variance); k >= 1 the Wilson-Hilferty normal
        k (1 - 1/(9k) + z / (3 sqrt k))^3; in between Gamma(k + 1) U^(1/k), Gamma(k + 1) again
        by Wilson-Hilferty.
        """
        mean, sampling, local = moments
        variance = sampling + local
        shape = np.divide(mean * mean, variance, out=np.zeros_like(mean), where=variance > 0)
        out[...] = 0.0
        flat_out, flat_mean, flat_shape = out.reshape(-1), mean.reshape(-1), shape.reshape(-1)
        u = 1.0 - rng.random(flat_mean.size, dtype=np.float32)  # in (0, 1]
        hit = np.flatnonzero(u < 2 * np.minimum(flat_shape, self.config.single_hit_below))
        p_hit = 2 * flat_shape[hit]
        flat_out[hit] = -np.log(u[hit] / p_hit) * flat_mean[hit] / p_hit
        rest = np.flatnonzero(flat_shape >= self.config.single_hit_below)
        k = flat_shape[rest].astype(np.float64)
        boosted = k < 1.0
        k_wh = np.where(boosted, k + 1.0, k)
        cube = np.maximum(1 - 1 / (9 * k_wh) + rng.standard_normal(k.size) / (3 * np.sqrt(k_wh)), 0.0) ** 3
        draw = k_wh * cube
        draw[boosted] *= rng.random(int(boosted.sum())) ** (1.0 / k[boosted])
        flat_out[rest] = draw * flat_mean[rest] / k
        total_mean = mean.sum(axis=1, dtype=np.float64)
        total_sampling = sampling.sum(axis=1, dtype=np.float64)
        has = (total_mean > 0) & (total_sampling > 0)
        target = np.zeros_like(total_mean)
        target[has] = rng.gamma(total_mean[has] ** 2 / total_sampling[has], total_sampling[has] / total_mean[has])
        drawn = out.sum(axis=1, dtype=np.float64)
        out *= np.divide(target, drawn, out=np.zeros_like(drawn), where=drawn > 0)[:, None].astype(np.float32)

    # -- public entry point ----------------------------------------------------------------------
    def simulate(self, n: int, *, particle: Union[str, int, Sequence[int], np.ndarray] = "electron",
                 energy: Union[float, tuple, Sequence[float], np.ndarray] = (1e3, 1e6),
                 theta: Union[float, tuple] = np.pi / 2, seed: Optional[int] = None,
                 rng: Optional[np.random.Generator] = None, threshold: bool = True) -> CaloShowers:
        """Simulate ``n`` showers; see :func:`simulate_showers` for the arguments."""
        if rng is not None and seed is not None:
            raise ValueError("give either seed or rng, not both")
        rng = rng if rng is not None else np.random.default_rng(seed)
        n = _check_count(n)
        energies = _energies(energy, n, rng)
        thetas = _angles(theta, n, rng)
        pdg = _particles(particle, n)
        showers = np.zeros((n, self.geometry.n_cells), dtype=np.float32)
        per_shower = 3 * 4 * self.geometry.n_cells * 4  # moments, draws and temporaries, float32
        chunk = int(np.clip(self.config.max_chunk_bytes // per_shower, 1, self.config.chunk_size))
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            kinds = np.abs(pdg[rows])
            moments = None
            for kind in (ELECTRON, PHOTON, PION):
                pick = np.flatnonzero(kinds == kind)
                if pick.size == 0:
                    continue
                part = self.mean_energies(kind, energies[rows][pick], thetas[rows][pick], rng)
                if pick.size == kinds.size:
                    moments = part
                    continue
                if moments is None:
                    moments = np.zeros((3, kinds.size, self.geometry.n_cells), np.float32)
                moments[:, pick] = part
            block = showers[rows]
            self._fluctuate(moments, rng, out=block)
            if self._response is not None:
                block *= self._response
            if threshold:
                block[block < self.geometry.readout_threshold_mev] = 0.0
        return CaloShowers(energies, showers, self.geometry.name, thetas, np.zeros(n), pdg)


def simulate_showers(geometry: Union[str, Geometry], n: int, *,
                     particle: Union[str, int, Sequence[int], np.ndarray] = "electron",
                     energy: Union[float, tuple, Sequence[float], np.ndarray] = (1e3, 1e6),
                     theta: Union[float, tuple] = np.pi / 2, seed: Optional[int] = None,
                     rng: Optional[np.random.Generator] = None, threshold: bool = True,
                     config: Optional[SimulatorConfig] = None) -> CaloShowers:
    """Simulate ``n`` calorimeter showers on a cylindrical geometry.

    Args:
        geometry: a cylindrical geometry or its name (e.g. ``"calochallenge-ds2"``).
        n: number of showers.
        particle: "electron", "photon", "pion" (also "positron", "gamma", "pi+", "pi-"), a PDG
            code (+-11, 22, +-211), or n PDG codes for a mixed sample.
        energy: incident energy in MeV: a ``(low, high)`` tuple draws log-uniformly between the
            bounds, a number fixes it, an array gives one per shower.
        theta: polar angle of the incident particle (radians; pi/2 is normal incidence): a
            number, or a ``(low, high)`` tuple drawn uniformly, inside (0, pi). The shower axis
            runs along (cos theta, 0, sin theta) in the mesh's (x, y, z).
        seed, rng: a seed, or a generator to draw from (not both).
        threshold: zero cells below the geometry's readout threshold.
        config: physics and batching knobs (:class:`SimulatorConfig`).

    Returns:
        :class:`~pcfm.data.events.CaloShowers` with float32 cell energies (MeV, in the
        geometry's energy response), incident energies, theta, phi (zero) and PDG codes.
    """
    return ShowerSimulator(geometry, config).simulate(n, particle=particle, energy=energy, theta=theta, seed=seed,
                                                      rng=rng, threshold=threshold)


def _row_sets(oblique: np.ndarray) -> list:
    """(rows, is_oblique) pairs covering all showers; a slice when one kind fills the batch."""
    if oblique.all() or not oblique.any():
        return [(slice(None), bool(oblique.any()))]
    return [(np.flatnonzero(~oblique), False), (np.flatnonzero(oblique), True)]


# -- argument parsing ----------------------------------------------------------------------------
# Errors name the argument (ArgumentError is a ValueError). Energies stop at the readers' bound
# (MAX_ENERGY_MEV, 10 TeV): a shower above it could be simulated but not written or read back.
def _check_count(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ArgumentError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def _energies(energy, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(energy, tuple):
        if len(energy) != 2:
            raise ArgumentError(f"energy: a range must be (low, high) in MeV, got {energy!r}")
        low, high = (float(e) for e in energy)
        if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high <= MAX_ENERGY_MEV):
            raise ArgumentError(f"energy: a range must satisfy 0 < low <= high <= {MAX_ENERGY_MEV:.0e} (MeV), "
                                f"got {energy!r}")
        return np.exp(rng.uniform(np.log(low), np.log(high), n))
    values = np.asarray(energy, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(n, float(values))
    if values.shape != (n,):
        raise ArgumentError(f"energy must be a number, a (low, high) tuple or {n} values, got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0) | (values > MAX_ENERGY_MEV))
    if bad.size:
        raise ArgumentError(f"energy: energies must be positive and finite, at most {MAX_ENERGY_MEV:.0e} MeV; "
                            f"shower {bad[0]} has {float(values[bad[0]])}")
    return values


def _angles(theta, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(theta, tuple):
        if len(theta) != 2:
            raise ArgumentError(f"a theta range must be (low, high) in radians, got {theta!r}")
        low, high = (float(t) for t in theta)
        if not (0 < low <= high < np.pi):
            raise ArgumentError(f"theta range must satisfy 0 < low <= high < pi, got {theta!r}")
        return rng.uniform(low, high, n)
    value = float(theta)
    if not 0 < value < np.pi:
        raise ArgumentError(f"theta must lie in (0, pi) radians (pi/2 is normal incidence), got {theta!r}")
    return np.full(n, value)


def _particles(particle, n: int) -> np.ndarray:
    if isinstance(particle, str):
        code = PARTICLE_ALIASES.get(particle.lower())
        if code is None:
            raise ArgumentError(f"unknown particle {particle!r}; known: {', '.join(PARTICLE_ALIASES)} or PDG codes "
                                f"{SUPPORTED_PDG}")
        return np.full(n, code, dtype=np.int64)
    codes = np.asarray(particle)
    if codes.ndim == 0:
        codes = np.full(n, codes)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise ArgumentError(f"particle must be a name, a PDG code or {n} PDG codes, got {particle!r}")
    unknown = np.setdiff1d(codes, SUPPORTED_PDG)
    if unknown.size:
        raise ArgumentError(f"particle: unsupported PDG code {int(unknown[0])}; supported: {SUPPORTED_PDG}")
    return codes.astype(np.int64)
