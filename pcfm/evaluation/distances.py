"""Distances between a generated and a reference sample of high-level features.

* Separation power (CaloChallenge): 0.5 * sum_b (h1_b - h2_b)^2 / (h1_b + h2_b) of the two
  normalised histograms of one feature; 0 for identical histograms, 1 for disjoint ones.
  Binning: ``n_bins`` equal-width bins over the reference's central quantile range
  [q, 1 - q] (default q = 0.001, so that a few outliers do not squeeze the bulk into one bin);
  values outside are counted in the first / last bin, so every shower counts. A constant
  reference feature gets the range [v - 0.5, v + 0.5] around its value.
* Frechet distance (FPD in the CaloChallenge): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
  of Gaussians fitted to the two samples. tr (S1 S2)^(1/2) is computed as the trace of the
  square root of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues), with both
  square roots from symmetric eigendecompositions and round-off negative eigenvalues clipped
  to 0: no complex arithmetic and no failure on singular covariances.
* Kernel distance (KPD): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(a, b) = (a.b / d + 1)^3, averaged over random batches (mean and standard deviation across
  batches), as in the JetNet / CaloChallenge definition. A batch holds at most half of the
  smaller sample, so that batches differ and their spread is a meaningful error. Values scatter around 0 (they can be
  slightly negative) when both samples come from one distribution.

Frechet and kernel distances are computed on features standardised with the reference's mean
and standard deviation (see :func:`standardise`), so that MeV and mm columns weigh alike; a
column the reference holds constant is scaled by the spread of both samples together.

Small samples: both distances are finite for any sample of at least :data:`MIN_SHOWERS` showers
(the kernel distance needs batches of two), but with fewer showers than features plus one the
sample covariances are singular and the Frechet distance is dominated by its small-sample bias
(of order features^2 / showers): :func:`small_sample_warning` says so in words, and
:func:`pcfm.evaluate` puts that in its results.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

#: Fewest showers per sample the distances accept (the kernel distance draws batches of two).
MIN_SHOWERS = 4


def histogram_edges(reference: np.ndarray, n_bins: int = 30, quantile: float = 0.001) -> np.ndarray:
    """Bin edges (n_bins + 1,) over the reference's [quantile, 1 - quantile] range."""
    low, high = np.quantile(reference, [quantile, 1.0 - quantile])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, n_bins + 1)


def normalised_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin, values outside the edges counted in the outer bins."""
    n_bins = len(edges) - 1
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """0.5 * sum (h1 - h2)^2 / (h1 + h2) of two normalised histograms (empty bins skipped)."""
    h1, h2 = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    total = h1 + h2
    filled = total > 0
    return float(0.5 * np.sum((h1[filled] - h2[filled]) ** 2 / total[filled]))


def separation_powers(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                      n_bins: int = 30, quantile: float = 0.001) -> dict[str, float]:
    """Separation power of every feature, binned on the reference (see the module docstring)."""
    powers = {}
    for name, ref in reference.items():
        edges = histogram_edges(ref, n_bins, quantile)
        powers[name] = separation_power(normalised_histogram(generated[name], edges),
                                        normalised_histogram(ref, edges))
    return powers


#: A reference column whose standard deviation is below this share of the largest value of the
#: column in either sample is constant up to round-off (see :func:`standardise`).
CONSTANT_COLUMN = 1e-9


def standardise(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both (N, F) samples shifted and scaled by the reference's column mean and standard
    deviation.

    A reference column that is constant (up to :data:`CONSTANT_COLUMN`: a width of 1e-8 mm
    where the other sample has millimetres) is scaled by the standard deviation of both samples
    together instead, so that a feature the reference never varies counts as a bounded
    difference, not as a division by round-off (once FPD 1e17 and KPD 1e42 for 12 showers); a
    column constant in both samples is only shifted.
    """
    generated, reference = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    scale = np.maximum(np.abs(generated).max(axis=0, initial=0.0), np.abs(reference).max(axis=0, initial=0.0))
    constant = ~(std > CONSTANT_COLUMN * scale)
    if constant.any():
        pooled = np.concatenate([generated[:, constant], reference[:, constant]]).std(axis=0)
        std[constant] = np.where(pooled > CONSTANT_COLUMN * scale[constant], pooled, 1.0)
    return (generated - mean) / std, (reference - mean) / std


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_moments(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between two Gaussians N(mu1, cov1), N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to samples ``x`` (N, F) and ``y`` (M, F)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return frechet_distance_from_moments(x.mean(axis=0), np.cov(x, rowvar=False),
                                         y.mean(axis=0), np.cov(y, rowvar=False))


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (a.b / d + 1)^3 between samples x (m, d) and y (n, d)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_distance(x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000, n_batches: int = 10,
                    seed: Optional[int] = 0) -> tuple[float, float]:
    """Kernel (polynomial MMD^2) distance: mean and standard deviation over ``n_batches`` random
    batches of ``batch_size`` rows from each sample (at most half of the smaller sample)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    size = min(batch_size, len(x) // 2, len(y) // 2)
    if size < 2:
        raise ValueError(f"the kernel distance needs at least {MIN_SHOWERS} samples on each side")
    rng = np.random.default_rng(seed)
    values = [_unbiased_mmd2(x[rng.choice(len(x), size, replace=False)],
                             y[rng.choice(len(y), size, replace=False)]) for _ in range(n_batches)]
    return float(np.mean(values)), float(np.std(values))


def small_sample_warning(n_generated: int, n_reference: int, n_features: int) -> Optional[str]:
    """Why the Frechet and kernel distances of samples this small are weak, or None when each
    sample has more showers than features (full-rank covariances)."""
    fewest = min(n_generated, n_reference)
    if fewest > n_features:
        return None
    return (f"FPD and KPD on {n_generated} generated and {n_reference} reference showers of {n_features} "
            f"features: the covariances are singular and the Frechet distance is dominated by its "
            f"small-sample bias (of order {n_features}^2 / showers); compare only evaluations of equal "
            f"sizes, and use at least {n_features + 1} showers a side for full-rank estimates")
