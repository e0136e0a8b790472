"""The simulator: events, particle guns, interactions and cosmics, built from the track,
cascade and readout parts (:mod:`~pcfm.sim.lartpc.tracks`, :mod:`~pcfm.sim.lartpc.cascade`,
:mod:`~pcfm.sim.lartpc.readout`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from pcfm.data.events import LArEvent
from pcfm.sim.lartpc.cascade import ElectromagneticCascade
from pcfm.sim.lartpc.physics import (LAR_DENSITY, LAR_ELECTRON_DEDX, LArTPCConfig, M_E, M_MU, PID_ELECTRON, PID_MUON,
                                     PID_PION, PID_PROTON, PRIMARIES, SEM_SHOWER)
from pcfm.sim.lartpc.readout import Readout
from pcfm.sim.lartpc.tracks import TrackTransport
from pcfm.sim.lartpc.transport import _EventRecord, _concat, _distance_to_exit, _inside, _isotropic


class LArTPCSimulator(TrackTransport, ElectromagneticCascade, Readout):
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
