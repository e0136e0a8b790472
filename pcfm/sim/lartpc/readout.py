"""Readout: deposits into voxels, charge (recombination, noise), low-energy blips, and the
finished event in the PILArNet-M layout."""
from __future__ import annotations

import numpy as np

from pcfm.data.events import LArEvent
from pcfm.sim.lartpc.physics import LAR_DENSITY, LAR_ELECTRON_DEDX, PID_LOW_ENERGY, SEM_LOW_ENERGY
from pcfm.sim.lartpc.transport import _isotropic, _renumber, _segment_offsets


class Readout:
    """Voxels and output of :class:`~pcfm.sim.lartpc.simulator.LArTPCSimulator` (a mixin of it)."""

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
