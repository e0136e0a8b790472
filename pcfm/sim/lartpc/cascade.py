"""Electromagnetic cascades: photon interactions (pair production, Compton, absorption),
bremsstrahlung of electrons above the critical energy, their final scattering tracks."""
from __future__ import annotations

import numpy as np

from pcfm.sim.lartpc.physics import (C_MM_PER_NS, LAR_CRITICAL_ENERGY, LAR_ELECTRON_DEDX, LAR_RADIATION_LENGTH_MM,
                                     M_E, PID_ELECTRON, _XI_PER_MM, _highland, _landau_like, photon_attenuation)
from pcfm.sim.lartpc.transport import (_compton, _concat, _deflect, _inside, _isotropic, _rejection, _segment_offsets,
                                       _take, _walk)


class ElectromagneticCascade:
    """Showers of :class:`~pcfm.sim.lartpc.simulator.LArTPCSimulator` (a mixin of it)."""

    def _electrons(self, energy, pos, direction, time, cluster, group, interaction, semantic):
        n = len(energy)
        return dict(photon=np.zeros(n, bool), energy=energy, pos=pos, dir=direction, time=time,
                    origin=pos.copy(), cluster=cluster, group=group, interaction=interaction,
                    semantic=np.full(n, semantic), pid=np.full(n, PID_ELECTRON))

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
