"""Geometry of transport: directions, Compton kinematics, exits from the volume, random walks
of scattering tracks, ragged-batch helpers, and the record of the event being simulated."""
from __future__ import annotations

import numpy as np

from pcfm.sim.lartpc.physics import M_E, PID_LOW_ENERGY, SEM_LOW_ENERGY


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
