"""Fast physics-based simulators: the embedded default data of pcfm.

- :func:`simulate_showers`: calorimeter showers (electrons, photons, charged pions) on any
  cylindrical geometry, after Grindhammer & Peters (hep-ex/0001020) for the EM part;
- :func:`simulate_lartpc_events`: LArTPC events in the PILArNet-M v2 layout (tracks, showers,
  Michel electrons, delta rays, low-energy deposits, with per-point labels).

Their output goes through the same containers and formats as real data.
"""
from pcfm.sim.calo import ShowerSimulator, SimulatorConfig, simulate_showers
from pcfm.sim.lartpc import LArTPCConfig, LArTPCSimulator, simulate_lartpc_event, simulate_lartpc_events

__all__ = ["simulate_showers", "ShowerSimulator", "SimulatorConfig", "simulate_lartpc_events",
           "simulate_lartpc_event", "LArTPCSimulator", "LArTPCConfig"]
