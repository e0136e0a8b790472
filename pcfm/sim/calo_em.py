"""Electromagnetic shower parameterisation of Grindhammer & Peters (hep-ex/0001020).

Formulas used (E in GeV where a logarithm of energy appears, y = E / E_c, Z the mass-weighted
effective atomic number, F_S = X0_eff / d_period, e^ = e/mip = 1 / (1 + 0.007 (Z_abs - Z_sens))):

* individual longitudinal profiles, homogeneous media (section 2.2 of the paper):
  <ln T> = ln(ln y - 0.812), <ln alpha> = ln(0.81 + (0.458 + 2.26 / Z) ln y),
  sigma(ln T) = (-1.4 + 1.26 ln y)^-1, sigma(ln alpha) = (-0.58 + 0.86 ln y)^-1,
  rho(ln T, ln alpha) = 0.705 - 0.023 ln y;
* sampling calorimeters (section 3): <ln T_sam> = ln(exp<ln T_hom> - 0.55 / F_S - 0.69 (1 - e^)),
  <ln alpha_sam> = ln(exp<ln alpha_hom> - 0.476 / F_S), sigma(ln T) = (-2.5 + 1.25 ln y)^-1,
  sigma(ln alpha) = (-0.82 + 0.79 ln y)^-1, rho = 0.784 - 0.023 ln y;
* radial profile f(r) = p 2r R_C^2 / (r^2 + R_C^2)^2 + (1 - p) 2r R_T^2 / (r^2 + R_T^2)^2 in
  Moliere radii, with tau the depth in units of the shower's centre of gravity scaled to T:
  R_C = z1 + z2 tau, z1 = 0.0251 + 0.00319 ln E, z2 = 0.1162 - 0.000381 Z;
  R_T = k1 (exp(k3 (tau - k2)) + exp(k4 (tau - k2))), k1 = 0.659 - 0.00309 Z, k2 = 0.645,
  k3 = -2.59, k4 = 0.3585 + 0.0421 ln E (Geant4's GFlash tuning writes 0.0412);
  p = p1 exp((p2 - tau) / p3 - exp((p2 - tau) / p3)), p1 = 2.632 - 0.00094 Z,
  p2 = 0.401 + 0.00187 Z, p3 = 1.313 - 0.0686 ln E; and for sampling calorimeters
  R_C += -0.0203 (1 - e^) + 0.0397 / F_S exp(-tau), R_T += -0.14 (1 - e^) - 0.495 / F_S exp(-tau),
  p += (1 - e^) (0.348 - 0.642 / F_S exp(-(tau - 1)^2));
* number of energy spots, whose count sets the local fluctuations of the deposits:
  N = 93 ln(Z) E^0.876 (homogeneous), N = (10.3 / c_s) E^0.959 (sampling, c_s the stochastic term).

Choices of ours, not in the paper: the atomic number of a material is estimated from its
critical energy, Z = 610 MeV / E_c - 1.24 (the PDG fit for solids and liquids), so that any
material in :mod:`pcfm.geometry.materials` works; widths sigma are capped at 0.5 and the means
kept above 0.1 where the fits leave their range (low y), as Geant4's GFlash does; the stochastic
term uses the sampling-frequency estimate c_s = 2.7% sqrt(d / f_mip) (Wigmans), with the sensor
thickness d expressed as the scintillator thickness (mm) that a MIP would lose the same energy
in, so that dense silicon sensors count for their energy loss, not their thickness.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcfm.geometry.cylindrical import CylindricalGeometry, SamplingStructure
from pcfm.geometry.materials import MATERIALS, Material

#: MIP energy loss of plastic scintillator (MeV/mm): the reference of the sampling-frequency estimate.
SCINTILLATOR_DEDX = MATERIALS["Scintillator"].mip_dedx_mev_per_mm


def material_z(material: Material) -> float:
    """Atomic number estimated from the critical energy, E_c = 610 MeV / (Z + 1.24)."""
    return 610.0 / material.critical_energy_mev - 1.24


@dataclass(frozen=True)
class LayerPhysics:
    """Per-layer shower constants of a calorimeter, arrays of length n_layers.

    ``inv_fs`` is 1 / F_S (zero for homogeneous layers), ``e_hat`` the e/mip ratio (one for
    homogeneous layers), ``dedx`` the thickness-averaged MIP energy loss (MeV/mm),
    ``stochastic_em`` / ``stochastic_had`` the relative resolutions at 1 GeV of the
    electromagnetic and hadronic sampling fluctuations.
    """

    x0_mm: np.ndarray
    lambda_mm: np.ndarray
    moliere_mm: np.ndarray
    critical_mev: np.ndarray
    z_eff: np.ndarray
    inv_fs: np.ndarray
    e_hat: np.ndarray
    homogeneous: np.ndarray
    dedx: np.ndarray
    stochastic_em: np.ndarray
    stochastic_had: np.ndarray


def _structure_constants(s: SamplingStructure, em_coefficient: float, homogeneous_term: float,
                         had_coefficient: float) -> tuple:
    period = s.absorber_mm + s.sensor_mm
    sensor_mass = s.sensor.density_g_cm3 * s.sensor_mm
    if s.absorber is None:
        z_eff, inv_fs, e_hat, stochastic = material_z(s.sensor), 0.0, 1.0, homogeneous_term
        dedx = s.sensor.mip_dedx_mev_per_mm
        mip_loss_per_period = dedx * s.sensor_mm
    else:
        absorber_mass = s.absorber.density_g_cm3 * s.absorber_mm
        z_abs, z_sens = material_z(s.absorber), material_z(s.sensor)
        z_eff = (absorber_mass * z_abs + sensor_mass * z_sens) / (absorber_mass + sensor_mass)
        inv_fs = period / s.x0_mm
        e_hat = 1.0 / (1.0 + 0.007 * (z_abs - z_sens))
        equivalent_mm = s.sensor_mm * s.sensor.mip_dedx_mev_per_mm / SCINTILLATOR_DEDX
        stochastic = em_coefficient * np.sqrt(equivalent_mm / s.mip_sampling_fraction)
        mip_loss_per_period = (s.absorber_mm * s.absorber.mip_dedx_mev_per_mm
                               + s.sensor_mm * s.sensor.mip_dedx_mev_per_mm)
        dedx = mip_loss_per_period / period
    # Hadronic sampling fluctuations grow with the MIP energy lost per sampling period (Wigmans).
    stochastic_had = had_coefficient * np.sqrt(mip_loss_per_period)
    return (s.x0_mm, s.interaction_length_mm, s.moliere_radius_mm, s.critical_energy_mev, z_eff,
            inv_fs, e_hat, s.absorber is None, dedx, stochastic, stochastic_had)


def layer_physics(geometry: CylindricalGeometry, em_coefficient: float = 0.027,
                  homogeneous_term: float = 0.02, had_coefficient: float = 0.115) -> LayerPhysics:
    """The shower constants of every layer of ``geometry``.

    Args:
        em_coefficient: c in the sampling-frequency estimate c sqrt(d / f_mip) of the EM stochastic term.
        homogeneous_term: stochastic term of a fully active (homogeneous) layer.
        had_coefficient: c in c sqrt(Delta E_mip / MeV) of the hadronic sampling term.
    """
    rows = [_structure_constants(layer.structure, em_coefficient, homogeneous_term, had_coefficient)
            for layer in geometry.layers]
    return LayerPhysics(*(np.array(column) for column in zip(*rows)))


def longitudinal_parameters(energy_mev: np.ndarray, critical_mev: np.ndarray, z: np.ndarray,
                            inv_fs: np.ndarray, e_hat: np.ndarray, homogeneous: np.ndarray,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-shower Gamma-profile parameters with correlated fluctuations of ln T and ln alpha.

    All arguments are per shower (the constants of the layer where the shower develops).
    Returns (alpha, beta, mean_alpha): the shower's profile is f(t) = beta (beta t)^(alpha-1)
    exp(-beta t) / Gamma(alpha) with t in radiation lengths from the shower start, and
    ``mean_alpha`` = exp<ln alpha> serves the radial depth scale tau.
    """
    ln_y = np.log(np.maximum(energy_mev / critical_mev, 1.0))
    t_hom = np.maximum(ln_y - 0.812, 0.1)
    a_hom = np.maximum(0.81 + (0.458 + 2.26 / z) * ln_y, 0.1)
    mean_ln_t = np.log(np.maximum(t_hom - 0.55 * inv_fs - 0.69 * (1 - e_hat), 0.1))
    mean_ln_a = np.log(np.maximum(a_hom - 0.476 * inv_fs, 0.1))
    sig_t = np.where(homogeneous, _width(-1.4, 1.26, ln_y), _width(-2.5, 1.25, ln_y))
    sig_a = np.where(homogeneous, _width(-0.58, 0.86, ln_y), _width(-0.82, 0.79, ln_y))
    rho = np.clip(np.where(homogeneous, 0.705, 0.784) - 0.023 * ln_y, -1.0, 1.0)
    z1, z2 = rng.standard_normal((2, energy_mev.shape[0]))
    common, opposite = np.sqrt((1 + rho) / 2) * z1, np.sqrt((1 - rho) / 2) * z2
    t_max = np.maximum(np.exp(mean_ln_t + sig_t * (common + opposite)), 0.1)
    alpha = np.maximum(np.exp(mean_ln_a + sig_a * (common - opposite)), 1.1)
    return alpha, (alpha - 1) / t_max, np.maximum(np.exp(mean_ln_a), 1.1)


def _width(c0: float, c1: float, ln_y: np.ndarray) -> np.ndarray:
    """sigma = 1 / (c0 + c1 ln y), capped at 0.5 where the fit leaves its range."""
    denominator = c0 + c1 * ln_y
    return np.where(denominator > 2.0, 1.0 / np.maximum(denominator, 2.0), 0.5)


def radial_parameters(tau: np.ndarray, energy_gev: np.ndarray, z: np.ndarray, inv_fs: np.ndarray,
                      e_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core radius, tail radius (Moliere radii) and core weight at depth ``tau`` (broadcasting)."""
    ln_e = np.log(energy_gev)
    tau = np.minimum(tau, 20.0)  # far behind the shower, where no energy is left
    r_core = 0.0251 + 0.00319 * ln_e + (0.1162 - 0.000381 * z) * tau
    k1, k4 = 0.659 - 0.00309 * z, 0.3585 + 0.0421 * ln_e
    r_tail = k1 * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    p1, p2, p3 = 2.632 - 0.00094 * z, 0.401 + 0.00187 * z, 1.313 - 0.0686 * ln_e
    arg = (p2 - tau) / p3
    p_core = p1 * np.exp(arg - np.exp(arg))
    damping = inv_fs * np.exp(-tau)
    r_core = r_core - 0.0203 * (1 - e_hat) + 0.0397 * damping
    r_tail = r_tail - 0.14 * (1 - e_hat) - 0.495 * damping
    p_core = p_core + (1 - e_hat) * (0.348 - 0.642 * inv_fs * np.exp(-(tau - 1) ** 2))
    r_core = np.maximum(r_core, 0.005)
    return r_core, np.maximum(r_tail, 1.05 * r_core), np.clip(p_core, 0.0, 1.0)


def spot_energy(energy_mev: np.ndarray, stochastic: np.ndarray, z: np.ndarray,
                homogeneous: np.ndarray) -> np.ndarray:
    """Mean energy (MeV) of one of the paper's energy spots: E / N_spot."""
    energy_gev = np.maximum(energy_mev, 1.0) / 1000.0
    n_sampling = 10.3 / stochastic * energy_gev**0.959
    n_homogeneous = 93.0 * np.log(z) * energy_gev**0.876
    return energy_mev / np.maximum(np.where(homogeneous, n_homogeneous, n_sampling), 1.0)
