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

The package: :mod:`~pcfm.sim.lartpc.physics` (constants, configuration, energy loss),
:mod:`~pcfm.sim.lartpc.transport` (kinematics and stepping helpers, the event record),
:mod:`~pcfm.sim.lartpc.tracks`, :mod:`~pcfm.sim.lartpc.cascade` and
:mod:`~pcfm.sim.lartpc.readout` (the parts of :class:`LArTPCSimulator`, in
:mod:`~pcfm.sim.lartpc.simulator`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from pcfm.data.events import LArEvent
from pcfm.errors import ArgumentError
from pcfm.sim.lartpc.physics import (C_MM_PER_NS, LAR_CRITICAL_ENERGY, LAR_DENSITY, LAR_ELECTRON_DEDX,
                                     LAR_MOLIERE_RADIUS_MM, LAR_RADIATION_LENGTH_MM, LArTPCConfig, MICHEL_MAX_ENERGY,
                                     MUON_LIFETIME_NS, MU_MINUS_ARGON_LIFETIME_NS, M_E, M_MU, M_P, M_PI, PID_ELECTRON,
                                     PID_LOW_ENERGY, PID_MUON, PID_PHOTON, PID_PION, PID_PROTON,
                                     PI_PLUS_DECAY_MUON_KE, PRIMARIES, SEM_DELTA, SEM_LOW_ENERGY, SEM_MICHEL,
                                     SEM_SHOWER, SEM_TRACK, bethe_dedx, csda_range, photon_attenuation,
                                     photon_interaction_length)
from pcfm.sim.lartpc.simulator import LArTPCSimulator


def _check_target(target_points) -> None:
    """Refuse a ``target_points`` that is not (lo, hi) with 0 < lo <= hi, both finite."""
    if target_points is None:
        return
    try:
        lo, hi = (float(v) for v in target_points)
    except (TypeError, ValueError):
        raise ArgumentError(f"target_points must be (lo, hi), got {target_points!r}") from None
    if not (np.isfinite(hi) and 0 < lo <= hi):
        raise ArgumentError(f"target_points must be (lo, hi) with 0 < lo <= hi, both finite, got {target_points!r}")


def _simulator(seed, rng, config, particles_per_event):
    config = config or LArTPCConfig()
    if particles_per_event is not None:
        config = replace(config, particles_per_event=tuple(particles_per_event))
    return LArTPCSimulator(config, seed=seed, rng=rng)


def simulate_lartpc_event(*, seed=None, particles_per_event=None, target_points=None,
                          rng: Optional[np.random.Generator] = None,
                          config: Optional[LArTPCConfig] = None) -> LArEvent:
    """One simulated LArTPC event in the PILArNet-M v2 layout (see :func:`simulate_lartpc_events`)."""
    _check_target(target_points)
    return _simulator(seed, rng, config, particles_per_event).event(target_points)


def simulate_lartpc_events(n_events: int, *, seed=None, particles_per_event=None, target_points=None,
                           rng: Optional[np.random.Generator] = None,
                           config: Optional[LArTPCConfig] = None) -> list[LArEvent]:
    """``n_events`` simulated LArTPC events in the PILArNet-M v2 layout.

    ``particles_per_event`` is the inclusive (lo, hi) range of primaries from interaction
    vertices (None: the config's, by default (1, 5)); ``target_points=(lo, hi)`` instead grows
    each event to roughly that many points. ``seed`` or ``rng`` make the run reproducible.
    """
    if isinstance(n_events, bool) or not isinstance(n_events, (int, np.integer)) or n_events < 0:
        raise ArgumentError(f"n_events must be a non-negative integer, got {n_events!r}")
    _check_target(target_points)
    return _simulator(seed, rng, config, particles_per_event).events(n_events, target_points)


__all__ = ["LArTPCSimulator", "simulate_lartpc_event", "simulate_lartpc_events", "C_MM_PER_NS", "LAR_CRITICAL_ENERGY", "LAR_DENSITY", "LAR_ELECTRON_DEDX", "LAR_MOLIERE_RADIUS_MM", "LAR_RADIATION_LENGTH_MM", "LArTPCConfig", "MICHEL_MAX_ENERGY", "MUON_LIFETIME_NS", "MU_MINUS_ARGON_LIFETIME_NS", "M_E", "M_MU", "M_P", "M_PI", "PID_ELECTRON", "PID_LOW_ENERGY", "PID_MUON", "PID_PHOTON", "PID_PION", "PID_PROTON", "PI_PLUS_DECAY_MUON_KE", "PRIMARIES", "SEM_DELTA", "SEM_LOW_ENERGY", "SEM_MICHEL", "SEM_SHOWER", "SEM_TRACK", "bethe_dedx", "csda_range", "photon_attenuation", "photon_interaction_length"]
