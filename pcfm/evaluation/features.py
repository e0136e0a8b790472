"""High-level features of voxelised showers on any cylindrical geometry.

These are the CaloChallenge features: total energy, its ratio to the incident energy, energy
per layer, and per layer the energy-weighted centre and width along x, y (the CaloChallenge
"eta" and "phi" directions, x = r cos(alpha), y = r sin(alpha) at the cell centres) and r, plus
the sparsity (share of cells above threshold). Cells under the geometry's readout threshold
are zeroed first, so generated showers are judged on what a detector would read out.

A layer without energy has centres and widths 0 (the CaloChallenge convention), not NaN; a
layer whose energy sits at one position (one hit cell) has width exactly 0 (widths are computed
about the centre, and round-off below :data:`WIDTH_ROUND_OFF` of the mesh's radius is zeroed).
Every per-layer quantity is a segmented sum over the layer's contiguous block of cells
(``np.add.reduceat`` at the geometry's layer offsets), so irregular geometries (dataset 1) cost
nothing extra; showers are processed in blocks to bound memory.
"""
from __future__ import annotations

import numpy as np

from pcfm.geometry.cylindrical import CylindricalGeometry


def apply_threshold(showers: np.ndarray, geometry: CylindricalGeometry) -> np.ndarray:
    """Cell energies (float64) with every cell under the readout threshold (or negative) set to 0."""
    cells = np.asarray(showers, dtype=np.float64)
    keep = (cells > 0) & (cells >= geometry.readout_threshold_mev)
    return np.where(keep, cells, 0.0)


def _layer_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of ``values`` (N, n_cells) over each layer's cells: (N, n_layers)."""
    return np.add.reduceat(values, offsets[:-1], axis=1)


def high_level_features(showers: np.ndarray, incident_energies: np.ndarray,
                        geometry: CylindricalGeometry, *, block_events: int = 4096) -> dict[str, np.ndarray]:
    """The high-level features of every shower, each an (N,) array, in a fixed order.

    Names: ``total_energy`` (MeV), ``energy_ratio`` (total / incident), then for each layer id
    ``L``: ``layer{L}_energy`` (MeV), ``layer{L}_{x,y,r}_centre`` and ``layer{L}_{x,y,r}_width``
    (mm, energy-weighted mean and standard deviation of the cell centres) and
    ``layer{L}_sparsity`` (share of the layer's cells above threshold).
    """
    incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    blocks = [_block_features(showers[a:a + block_events], geometry)
              for a in range(0, len(incident), block_events)]
    per_layer = {name: np.concatenate([b[name] for b in blocks]) if blocks else np.zeros((0, geometry.n_layers))
                 for name in _PER_LAYER}
    total = per_layer["energy"].sum(axis=1)
    features = {"total_energy": total, "energy_ratio": total / incident}
    for i, layer_id in enumerate(geometry.layer_ids):
        for name in _PER_LAYER:
            features[f"layer{layer_id}_{name}"] = per_layer[name][:, i]
    return features


#: Widths below this share of the mesh's outer radius are round-off (a real width is at least
#: about 1e-4 of a cell: the smallest energy share above threshold is about 1e-8).
WIDTH_ROUND_OFF = 1e-10


def _extent_mm(geometry: CylindricalGeometry) -> float:
    return float(max(layer.r_edges_mm[-1] for layer in geometry.layers))


_AXES = ("x", "y", "r")
_PER_LAYER = ("energy", *(f"{a}_{q}" for a in _AXES for q in ("centre", "width")), "sparsity")


def _block_features(showers: np.ndarray, geometry: CylindricalGeometry) -> dict[str, np.ndarray]:
    """Per-layer features (N, n_layers) of one block of showers."""
    cells = apply_threshold(showers, geometry)
    offsets = geometry.layer_offsets
    r, alpha, _ = geometry.cylindrical().T
    positions = {"x": r * np.cos(alpha), "y": r * np.sin(alpha), "r": r}
    energy = _layer_sums(cells, offsets)
    safe_energy = np.where(energy > 0, energy, 1.0)
    cells_per_layer = np.diff(offsets)
    out = {"energy": energy}
    for axis in _AXES:
        mean = _layer_sums(cells * positions[axis], offsets) / safe_energy
        # two passes (spread about the layer's centre), not E[p^2] - E[p]^2: a layer with one hit
        # cell must have width 0, not the square root of a round-off (~1e-6 mm), which
        # standardisation would then blow up (see pcfm.evaluation.distances)
        spread = positions[axis] - np.repeat(mean, cells_per_layer, axis=1)
        np.square(spread, out=spread)
        spread *= cells  # in place: one (N, n_cells) array per axis, as before
        width = np.sqrt(_layer_sums(spread, offsets) / safe_energy)
        out[f"{axis}_centre"] = mean
        out[f"{axis}_width"] = np.where(width > WIDTH_ROUND_OFF * _extent_mm(geometry), width, 0.0)
    out["sparsity"] = _layer_sums((cells > 0).astype(np.float64), offsets) / np.diff(offsets)
    return out


def feature_matrix(features: dict[str, np.ndarray]) -> np.ndarray:
    """The features as one (N, n_features) array, columns in the dict's order."""
    return np.stack(list(features.values()), axis=1)


def low_level_inputs(showers: np.ndarray, incident_energies: np.ndarray,
                     geometry: CylindricalGeometry) -> np.ndarray:
    """Classifier inputs per shower: thresholded cell energies / incident energy, then
    log10(incident energy / MeV) as the last column: (N, n_cells + 1), float32."""
    incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
    cells = np.asarray(showers, dtype=np.float32)
    ratio = np.where((cells > 0) & (cells >= geometry.readout_threshold_mev), cells, 0.0) / incident.astype(np.float32)
    return np.concatenate([ratio, np.log10(incident).astype(np.float32)], axis=1)
