"""Features of the simple references (:mod:`references`): ~280 high-level features per shower
(layer energies, depth and radial moments, hit counts, ...) and local features per LArTPC point
(energy, neighbour counts, local PCA shape, fragment size).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- shower features

#: Features of each readout layer, in this order, layer after layer.
SHOWER_LAYER_FEATURES = ("log_frac", "log_hits", "r_mean", "r_rms", "xy_eig_ratio", "xy_asymmetry")
#: ``log_frac`` is log(fraction + FRACTION_FLOOR): an empty layer reads log(1e-6) = -13.8.
FRACTION_FLOOR = 1e-6
#: Features of the whole shower, after the per-layer ones (``log_incident_energy`` last, optional).
SHOWER_GLOBAL_FEATURES = ("log_visible_energy", "depth_centroid", "depth_spread", "first_layer_1pct",
                          "first_layer_hit", "max_layer", "frac_first3", "frac_first5", "r_mean", "r_rms",
                          "xy_eig_ratio", "xy_asymmetry", "hits")
#: Events per chunk in :func:`shower_features` (bounds the memory of the concatenated points).
_CHUNK_EVENTS = 2000


def shower_feature_names(n_layers: int = 45, use_incident_energy: bool = True) -> list[str]:
    """Names of the columns of :func:`shower_features` for a geometry of ``n_layers`` layers."""
    names = [f"layer{l}/{f}" for l in range(n_layers) for f in SHOWER_LAYER_FEATURES]
    names += list(SHOWER_GLOBAL_FEATURES)
    if use_incident_energy:
        names.append("log_incident_energy")
    return names


#: Columns of :func:`shower_features` on the 45-layer presets, with the incident energy (283 + 1).
SHOWER_FEATURE_NAMES = tuple(shower_feature_names(45, True))


def _layers_of(event, geometry) -> np.ndarray:
    """Layer position of every point: from its cell, else from its depth z (nearest layer)."""
    z = np.asarray(event.pos, dtype=np.float64).reshape(-1, 3)[:, 2]
    fronts = np.array([layer.z_front_mm for layer in geometry.layers])
    layer = np.clip(np.searchsorted(fronts, z, side="right") - 1, 0, geometry.n_layers - 1)
    cell = getattr(event, "cell", None)
    if cell is not None:
        cell = np.asarray(cell, dtype=np.int64).reshape(-1)
        known = (cell >= 0) & (cell < geometry.n_cells)
        if known.any():
            layer[known] = geometry.cell_bins(cell[known])[:, 0]
    return layer


def _weighted_shape(keys: np.ndarray, n_bins: int, e: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Energy-weighted shape per bin of ``keys``: (total energy, radial mean, radial rms, x-y
    eigenvalue ratio, x-y asymmetry); see :func:`shower_features`."""
    def total(w):
        return np.bincount(keys, weights=w, minlength=n_bins)

    r = np.hypot(x, y)
    energy = total(e)
    with np.errstate(invalid="ignore", divide="ignore"):
        inverse = np.where(energy > 0, 1.0 / energy, 0.0)
        inverse_r = np.where(r > 0, 1.0 / r, 0.0)  # a point on the axis has no direction
    r_mean = total(e * r) * inverse
    r_rms = np.sqrt(np.maximum(total(e * r * r) * inverse - r_mean ** 2, 0.0))
    cos, sin = x * inverse_r, y * inverse_r
    # normalised quadrupole |sum E exp(2 i alpha)| / sum E and dipole |sum E exp(i alpha)| / sum E
    quadrupole = np.hypot(total(e * (cos * cos - sin * sin)), total(2 * e * cos * sin)) * inverse
    dipole = np.hypot(total(e * cos), total(e * sin)) * inverse
    eig_ratio = np.where(energy > 0, (1 - quadrupole) / (1 + quadrupole), 0.0)
    return energy, r_mean, r_rms, eig_ratio, dipole


def shower_features(events: Sequence, geometry=None, *, use_incident_energy: bool = True) -> np.ndarray:
    """High-level calorimeter features (n_events, F) of PyG point clouds of voxelised showers.

    Why these: they are what a calorimeter physicist reads off a shower (its longitudinal
    profile, lateral width and shape per layer, start and depth), so a linear model or trees on
    them is the natural reference for what a network should at least learn.

    Per layer (:data:`SHOWER_LAYER_FEATURES`): the log of the layer's energy fraction of the
    visible total (floored at :data:`FRACTION_FLOOR`), log(1 + number of hits), the
    energy-weighted mean and rms radius (mm), and two transverse shapes about the mesh axis:
    ``xy_eig_ratio``, the smaller over the larger eigenvalue of the energy-weighted covariance of
    the points' transverse directions (x, y) / r, that is (1 - q) / (1 + q) with q = |sum E
    exp(2 i alpha)| / sum E (1: round, 0: two opposite prongs, as the two photons of a pi0), and
    ``xy_asymmetry`` = |sum E exp(i alpha)| / sum E (0: centred, 1: all on one side: an
    asymmetric pi0 decay, an oblique shower). Directions, not the plain x-y covariance, because
    that weights every hit by r^2, so the rare far hits swamp the core where two photons show:
    on the Geant4 gamma / pi0 pair the logistic regression with 100 labels reaches 0.72 with the
    plain covariance, 0.95 with the direction ratio and 0.97 with the asymmetry added. Logarithms
    because a shower's longitudinal profile is a Gamma law, linear in the log fractions, and the
    first layers' tiny fractions (where an electron and a late-converting photon differ)
    matter: on par04-scipb pid they lift the logistic regression by 0.01-0.02 in accuracy over
    plain fractions and counts.

    Then :data:`SHOWER_GLOBAL_FEATURES`: log visible energy (MeV), depth centroid and spread in
    layers, the first layer holding > 1 % of the energy, the first layer with any hit, the layer
    of maximum energy, the energy fractions of the first 3 and 5 layers, the overall radial mean
    and rms, the overall eigenvalue ratio and asymmetry, the number of hits; with
    ``use_incident_energy`` the log incident energy (MeV) last (0 when unknown). Leave it out
    when regressing that energy.

    ``geometry`` (a name or a geometry; default: each event's ``geometry`` field) gives the
    layers; points are placed in layers by their ``cell`` (or by depth when it is -1).
    Computed with ``bincount`` over (event, layer) keys, a chunk of events at a time. An empty
    shower gives zeros; no value is NaN. Columns: :func:`shower_feature_names`.
    """
    from pcfm import geometry as geometries

    events = list(events)
    if geometry is None:
        names = {getattr(event, "geometry", None) for event in events}
        if len(names) != 1 or not next(iter(names)):
            raise ValueError(f"pass geometry=: the events name {sorted(map(str, names))}")
        geometry = names.pop()
    geometry = geometries.get(geometry)
    n_layers = geometry.n_layers
    n_features = len(shower_feature_names(n_layers, use_incident_energy))
    out = np.zeros((len(events), n_features))
    for start in range(0, len(events), _CHUNK_EVENTS):
        chunk = events[start:start + _CHUNK_EVENTS]
        out[start:start + len(chunk)] = _shower_chunk(chunk, geometry, use_incident_energy)
    return out


def _shower_chunk(events: Sequence, geometry, use_incident_energy: bool) -> np.ndarray:
    n_events, n_layers = len(events), geometry.n_layers
    sizes = np.array([int(event.pos.shape[0]) for event in events], dtype=np.int64)
    event_of = np.repeat(np.arange(n_events), sizes)
    if sizes.sum():
        pos = np.concatenate([np.asarray(ev.pos, dtype=np.float64).reshape(-1, 3) for ev in events])
        e = np.concatenate([np.asarray(ev.energy, dtype=np.float64).reshape(-1) for ev in events])
        layer = np.concatenate([_layers_of(ev, geometry) for ev in events])
    else:
        pos, e, layer = np.zeros((0, 3)), np.zeros(0), np.zeros(0, dtype=np.int64)
    e = np.maximum(e, 0.0)
    x, y = pos[:, 0], pos[:, 1]
    keys = event_of * n_layers + layer

    energy, r_mean, r_rms, eig, asymmetry = (v.reshape(n_events, n_layers)
                                             for v in _weighted_shape(keys, n_events * n_layers, e, x, y))
    hits = np.bincount(keys, minlength=n_events * n_layers).reshape(n_events, n_layers).astype(np.float64)
    visible = energy.sum(1)
    frac = np.divide(energy, visible[:, None], out=np.zeros_like(energy), where=visible[:, None] > 0)
    per_layer = np.stack([np.log(frac + FRACTION_FLOOR), np.log1p(hits), r_mean, r_rms, eig, asymmetry], axis=2)
    per_layer = per_layer.reshape(n_events, -1)

    index = np.arange(n_layers, dtype=np.float64)
    centroid = frac @ index
    spread = np.sqrt(np.maximum(frac @ index ** 2 - centroid ** 2, 0.0))
    above = frac > 0.01
    first = np.where(above.any(1), above.argmax(1), 0).astype(np.float64)
    hit = hits > 0
    first_hit = np.where(hit.any(1), hit.argmax(1), 0).astype(np.float64)
    peak = np.where(visible > 0, frac.argmax(1), 0).astype(np.float64)
    _, r_all, rms_all, eig_all, asymmetry_all = _weighted_shape(event_of, n_events, e, x, y)
    columns = [np.log(np.maximum(visible, 1e-3)) * (visible > 0), centroid, spread, first, first_hit, peak,
               frac[:, :3].sum(1), frac[:, :5].sum(1), r_all, rms_all, eig_all, asymmetry_all, hits.sum(1)]
    if use_incident_energy:
        incident = np.array([float(np.asarray(getattr(ev, "incident_energy", np.nan)).reshape(-1)[0])
                             if getattr(ev, "incident_energy", None) is not None else np.nan for ev in events])
        columns.append(np.where(np.isfinite(incident) & (incident > 0), np.log(np.maximum(incident, 1e-30)), 0.0))
    out = np.concatenate([per_layer, np.stack(columns, axis=1)], axis=1)
    out[visible <= 0] = 0.0  # an empty shower: zeros throughout
    return out


# ----------------------------------------------------------------------------- point features

#: Columns of :func:`point_features`.
POINT_FEATURE_NAMES = (
    "log_energy",
    "neighbours_1.5", "neighbours_3", "neighbours_6",  # other points within 1.5 / 3 / 6 voxel pitches
    "neighbour_energy_1.5", "neighbour_energy_3", "neighbour_energy_6",  # their summed energy (MeV)
    "energy_contrast",  # log energy minus log mean neighbour energy within 3 pitches
    "knn_mean_distance",  # mean distance to the k nearest points (mm)
    "linearity", "planarity", "scattering",  # local PCA on the k nearest points
    "direction_x", "direction_y", "direction_z",  # |components| of the local principal direction
    "fragment_points", "fragment_energy", "fragment_energy_fraction",
    "fragment_linearity", "fragment_extent",  # PCA of the point's connected fragment; extent (mm)
    "fragment_far_end", "fragment_near_end",  # distance along the fragment axis to its far end / extent,
    #                                           and to its near end (mm)
    "fragment_axis_distance", "fragment_alignment",  # distance from the fragment axis (mm);
    #                                                  |cos| of local vs fragment direction
    "event_log_points", "event_log_energy",
)
#: Neighbourhood radii in voxel pitches, k of the local PCA, fragment linking radius in pitches.
NEIGHBOUR_RADII = (1.5, 3.0, 6.0)
PCA_NEIGHBOURS = 16
FRAGMENT_RADIUS = 1.8


def _pca(cov: np.ndarray):
    """(linearity, planarity, scattering, principal direction) of covariances (m, 3, 3)."""
    values, vectors = np.linalg.eigh(cov)
    sigma = np.sqrt(np.maximum(values, 0.0))  # ascending
    s1 = sigma[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        inverse = np.where(s1 > 1e-9, 1.0 / s1, 0.0)
    linearity = (sigma[:, 2] - sigma[:, 1]) * inverse
    planarity = (sigma[:, 1] - sigma[:, 0]) * inverse
    scattering = sigma[:, 0] * inverse
    return linearity, planarity, scattering, vectors[:, :, 2]


def point_features(event, *, pitch_mm: Optional[float] = None) -> np.ndarray:
    """Local features (n_points, 26) of a LArTPC event's points, for per-point classification.

    Why these: the five classes differ in local shape and context, not in position. Tracks are
    locally linear and long; showers are scattered and branchy; Michel electrons are short
    fragments at the end of a track (near a fragment end); delta rays are short branches off a
    track (off its axis, at an angle to it); low-energy deposits are isolated blips (few
    neighbours, tiny fragments). Columns: :data:`POINT_FEATURE_NAMES`: log energy; counts and
    summed energies of the other points within :data:`NEIGHBOUR_RADII` voxel pitches; local
    PCA on the :data:`PCA_NEIGHBOURS` nearest points (linearity, planarity, scattering from
    the square roots of the eigenvalues, and the principal direction's |components|); the
    point's connected fragment (points linked within :data:`FRAGMENT_RADIUS` pitches): size,
    energy, share of the event's energy, PCA linearity and extent along its axis, the point's
    distance to the far end (over the extent) and to the near end, its distance from the axis
    and the alignment of its local direction with the axis; the event's size and energy.

    ``pitch_mm`` defaults to the voxel size in ``event.x`` (columns 1-3), else 3 mm. Uses
    scipy's cKDTree and connected components: no Python loop over points.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pos = np.asarray(event.pos, dtype=np.float64).reshape(-1, 3)
    energy = np.maximum(np.asarray(event.energy, dtype=np.float64).reshape(-1), 0.0)
    n = pos.shape[0]
    out = np.zeros((n, len(POINT_FEATURE_NAMES)))
    if n == 0:
        return out
    if pitch_mm is None:
        x = getattr(event, "x", None)
        pitch_mm = float(np.asarray(x)[0, 1]) if x is not None and np.asarray(x).shape[-1] >= 2 else 3.0
        pitch_mm = pitch_mm if pitch_mm > 0 else 3.0
    columns: dict[str, np.ndarray] = {"log_energy": np.log(np.maximum(energy, 1e-6))}

    tree = cKDTree(pos)
    radii = pitch_mm * np.asarray(NEIGHBOUR_RADII)
    pairs = tree.query_pairs(radii.max(), output_type="ndarray")
    i, j = (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    distance = np.linalg.norm(pos[i] - pos[j], axis=1)
    for name, radius in zip(NEIGHBOUR_RADII, radii):
        near = distance <= radius
        a, b = i[near], j[near]
        columns[f"neighbours_{name:g}"] = (np.bincount(a, minlength=n) + np.bincount(b, minlength=n)).astype(float)
        columns[f"neighbour_energy_{name:g}"] = (np.bincount(a, energy[b], minlength=n)
                                                 + np.bincount(b, energy[a], minlength=n))
    count3, energy3 = columns["neighbours_3"], columns["neighbour_energy_3"]
    mean3 = np.divide(energy3, count3, out=np.zeros(n), where=count3 > 0)
    columns["energy_contrast"] = np.where(count3 > 0, columns["log_energy"] - np.log(np.maximum(mean3, 1e-6)), 0.0)

    k = min(PCA_NEIGHBOURS, n)
    dist_k, idx_k = tree.query(pos, k=k)
    dist_k, idx_k = dist_k.reshape(n, k), idx_k.reshape(n, k)
    columns["knn_mean_distance"] = dist_k[:, 1:].mean(1) if k > 1 else np.zeros(n)
    local = pos[idx_k] - pos[idx_k].mean(1, keepdims=True)
    linearity, planarity, scattering, direction = _pca(np.einsum("nki,nkj->nij", local, local) / k)
    columns.update(linearity=linearity, planarity=planarity, scattering=scattering)
    columns.update(direction_x=np.abs(direction[:, 0]), direction_y=np.abs(direction[:, 1]),
                   direction_z=np.abs(direction[:, 2]))

    linked = distance <= FRAGMENT_RADIUS * pitch_mm
    graph = coo_matrix((np.ones(int(linked.sum())), (i[linked], j[linked])), shape=(n, n))
    n_fragments, label = connected_components(graph, directed=False)
    size = np.bincount(label, minlength=n_fragments).astype(float)
    f_energy = np.bincount(label, energy, minlength=n_fragments)
    total = energy.sum()
    mean = np.stack([np.bincount(label, pos[:, c], minlength=n_fragments) for c in range(3)], 1) / size[:, None]
    centred = pos - mean[label]
    cov = np.empty((n_fragments, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(label, centred[:, a] * centred[:, b], minlength=n_fragments) / size
    f_linearity, _, _, axis = _pca(cov)
    along = np.einsum("ni,ni->n", centred, axis[label])
    order = np.argsort(label, kind="stable")
    starts = np.concatenate([[0], np.cumsum(size.astype(np.int64))[:-1]])
    low = np.minimum.reduceat(along[order], starts)[label]
    high = np.maximum.reduceat(along[order], starts)[label]
    extent = high - low
    columns.update(
        fragment_points=size[label], fragment_energy=f_energy[label],
        fragment_energy_fraction=f_energy[label] / total if total > 0 else np.zeros(n),
        fragment_linearity=f_linearity[label], fragment_extent=extent,
        fragment_far_end=np.divide(np.maximum(along - low, high - along), extent, out=np.zeros(n), where=extent > 0),
        fragment_near_end=np.minimum(along - low, high - along),
        fragment_axis_distance=np.sqrt(np.maximum(np.einsum("ni,ni->n", centred, centred) - along ** 2, 0.0)),
        fragment_alignment=np.abs(np.einsum("ni,ni->n", direction, axis[label])),
        event_log_points=np.full(n, math.log(n)), event_log_energy=np.full(n, math.log(max(total, 1e-6))),
    )
    for c, name in enumerate(POINT_FEATURE_NAMES):
        out[:, c] = columns[name]
    return out


class PointSet:
    """Per-point features, labels and event boundaries of a list of LArTPC events, computed once
    (:func:`segment` takes events or these, so that a test set is featurised only once)."""

    def __init__(self, events: Sequence, *, pitch_mm: Optional[float] = None):
        events = list(events)
        features = [point_features(event, pitch_mm=pitch_mm) for event in events]
        self.X = np.concatenate(features) if features else np.zeros((0, len(POINT_FEATURE_NAMES)))
        labels = [np.asarray(event.semantic, dtype=np.int64).reshape(-1) for event in events]
        self.y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.sizes = np.array([len(f) for f in features], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    @classmethod
    def from_arrays(cls, X: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> "PointSet":
        self = cls.__new__(cls)
        self.X, self.y, self.sizes = X, y, np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        return self

    def __len__(self) -> int:
        return len(self.sizes)

    def subset(self, events: Sequence[int]) -> "PointSet":
        """The events ``events`` (indices) only."""
        events = np.asarray(events, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[e], self.offsets[e + 1]) for e in events]) \
            if len(events) else np.zeros(0, dtype=np.int64)
        return PointSet.from_arrays(self.X[rows], self.y[rows], self.sizes[events])
