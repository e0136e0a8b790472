"""Charged-pion shower ingredients: electromagnetic fraction, hadronic longitudinal profile.

A pion showers after an exponential first-interaction depth (mean one nuclear interaction
length). Its energy splits into an electromagnetic part (pi0 -> gamma gamma), seen like an
electron shower, and a hadronic part of which a share is invisible (nuclear binding energy,
neutrons): an e/h > 1 calorimeter sees it scaled down by h/e.

* mean EM fraction (Groom's power law): <f_em> = 1 - (E / E0)^(k - 1), E0 = 1 GeV, k = 0.82;
  per shower f_em follows a Beta law of that mean (its large event-to-event spread is what
  makes hadronic resolution poor);
* hadronic longitudinal profile in interaction lengths from the interaction point, the
  hadronic term of Bock et al. (NIM 186 (1981) 533): f(s) ~ s^(a-1) exp(-d s) with
  a = 0.6165 + 0.3183 ln E, d = 0.9099 - 0.0237 ln E (E in GeV, s in lambda_I), the shape a
  fluctuating log-normally per shower.

Simplifications, ours: the EM part is one shower starting at the interaction point (not a sum
of pi0 sub-showers), the hadronic radial profile is a fixed two-component core + halo in units
of the local interaction length, and the invisible fraction is a Gaussian smear of h/e.
"""
from __future__ import annotations

import numpy as np


def em_fraction(energy_mev: np.ndarray, rng: np.random.Generator, e0_mev: float = 1000.0,
                k: float = 0.82, concentration: float = 10.0) -> np.ndarray:
    """Per-shower EM fraction: Beta-distributed around 1 - (E/E0)^(k-1) (kept in [0.02, 0.98])."""
    mean = np.clip(1.0 - (np.maximum(energy_mev, e0_mev) / e0_mev) ** (k - 1.0), 0.02, 0.98)
    return rng.beta(mean * concentration, (1.0 - mean) * concentration)


def hadronic_shape(energy_mev: np.ndarray, rng: np.random.Generator,
                   shape_sigma: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Bock's hadronic Gamma-profile (shape a, rate d per lambda_I), a fluctuating per shower."""
    ln_e = np.log(np.maximum(energy_mev, 1000.0) / 1000.0)
    shape = np.maximum(0.6165 + 0.3183 * ln_e, 0.5) * np.exp(shape_sigma * rng.standard_normal(ln_e.shape))
    return shape, 0.9099 - 0.0237 * ln_e


def visible_hadronic_fraction(n: int, rng: np.random.Generator, h_over_e: float = 0.65,
                              sigma: float = 0.07) -> np.ndarray:
    """Share of the hadronic energy an electron-calibrated calorimeter sees, per shower."""
    return np.clip(h_over_e + sigma * rng.standard_normal(n), 0.3, 1.0)
