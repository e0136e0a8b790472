"""Heavy charged tracks: stepping with energy loss, delta rays and scattering, and how they end
(muon decays to Michel electrons, pion decays, absorption and hadronic interactions)."""
from __future__ import annotations

import numpy as np

from pcfm.sim.lartpc.physics import (C_MM_PER_NS, MICHEL_MAX_ENERGY, MUON_LIFETIME_NS, MU_MINUS_ARGON_LIFETIME_NS,
                                     M_E, M_MU, M_P, M_PI, PID_ELECTRON, PID_MUON, PID_PION, PID_PROTON,
                                     PI_PLUS_DECAY_MUON_KE, SEM_DELTA, SEM_MICHEL, SEM_TRACK, _XI_PER_MM, _highland,
                                     _kinetic_from_range, _landau_like, _range_of, bethe_dedx)
from pcfm.sim.lartpc.transport import (_concat, _deflect, _distance_to_exit, _inside, _isotropic, _rejection,
                                       _segment_offsets, _take, _walk)


class TrackTransport:
    """Tracks of :class:`~pcfm.sim.lartpc.simulator.LArTPCSimulator` (a mixin of it)."""

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
