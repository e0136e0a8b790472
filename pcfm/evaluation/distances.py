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
  k(a, b) = (a.b / d + 1)^3 (the kernel of the KID of Binkowski et al.), averaged over random
  batches (mean and standard deviation across batches). A batch holds at most half of the
  smaller sample, so that batches differ and their spread is a meaningful error. Values scatter around 0 (they can be
  slightly negative) when both samples come from one distribution. (JetNet's KPD, which the
  CaloChallenge evaluation reports, differs: see below.)

Frechet and kernel distances are computed on features standardised with the reference's mean
and standard deviation (see :func:`standardise`), so that MeV and mm columns weigh alike; a
column the reference holds constant is scaled by the spread of both samples together.

The JetNet definitions (:func:`frechet_distance_extrapolated`, :func:`kernel_distance_jetnet`)
are those of ``jetnet.evaluation.fpd`` and ``kpd`` (Kansal et al., arXiv:2211.10295; read in
jet-net/JetNet, ``jetnet/evaluation/gen_metrics.py``), which the CaloChallenge evaluation calls on
its high-level classifier inputs (:func:`calochallenge_distance_inputs`). pcfm computes them
itself (jetnet is not a dependency), drawing batches in JetNet's order from the same seeded
generators (not checked against jetnet itself, which pcfm does not install). Their differences from the two above: features divided by the reference's largest
absolute value instead of standardised; FPD extrapolated to infinitely many showers instead of
taken on the whole samples; KPD with a quartic kernel, reported as median and half the 16-84 %
spread of its batches; batches drawn with replacement and of a fixed size, whatever the sample size.

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


# --- the JetNet definitions (FPD and KPD as the CaloChallenge evaluation reports them) ----------
#: Settings of the CaloChallenge evaluation's calls ``jetnet.evaluation.fpd(reference, generated,
#: min_samples=10000)`` and ``kpd(reference, generated, batch_size=10000)`` (as read in evaluation
#: code derived from the official ``evaluate.py``); the other values are JetNet's defaults.
CALOCHALLENGE_FPD = {"min_samples": 10_000, "max_samples": 50_000, "num_batches": 20, "num_points": 10}
CALOCHALLENGE_KPD = {"num_batches": 10, "batch_size": 10_000}
#: Fewest showers a side for which pcfm uses those settings; below, see :func:`jetnet_settings`.
CALOCHALLENGE_MIN_SHOWERS = 10_000
#: JetNet's default seed of both distances.
JETNET_SEED = 42
#: Rows of a kernel matrix computed at once (bounds memory: 1024 x 10000 doubles is 80 MB).
KERNEL_BLOCK_ROWS = 1024


def jetnet_normalise(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both (N, F) samples divided column by column by the reference's largest absolute value
    (1 for a column that is 0 throughout): JetNet's ``normalise=True``, whose "real" sample is
    the reference."""
    generated, reference = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    scale = np.abs(reference).max(axis=0)
    scale[scale == 0] = 1.0
    return generated / scale, reference / scale


def _check_samples(generated: np.ndarray, reference: np.ndarray) -> None:
    for role, sample in (("generated", generated), ("reference", reference)):
        if sample.ndim != 2 or len(sample) < 2:
            raise ValueError(f"the {role} sample must have shape (N, F) with N >= 2, got {sample.shape}")
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"the samples have {generated.shape[1]} and {reference.shape[1]} features")


def fpd_batch_sizes(min_samples: int, max_samples: int, num_points: int) -> np.ndarray:
    """The ``num_points`` batch sizes, evenly spaced in 1/N from ``min_samples`` to
    ``max_samples`` and truncated to integers as JetNet does (so 50000 becomes 49999)."""
    return (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int32)


def fit_intercept(inverse_sizes: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(a, error of a) of the least-squares line values = a + b / N with a, b >= 0.

    The bounds and the error are those of JetNet's ``curve_fit(..., bounds=([0, 0], [inf,
    inf]))``: the error is the square root of the intercept's entry of s^2 (X^T X)^-1, with
    s^2 = (sum of squared residuals at the bounded solution) / (points - 2), and is infinite
    with two points. A bounded linear least-squares problem in two unknowns has its optimum at
    the free solution or on a bound, so the candidates are tried in turn.
    """
    x, y = np.asarray(inverse_sizes, dtype=np.float64), np.asarray(values, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    free = np.linalg.lstsq(design, y, rcond=None)[0]
    sxx, sxy = float(x @ x), float(x @ y)
    candidates = [free] if np.all(free >= 0) else [
        np.array([0.0, max(sxy / sxx, 0.0) if sxx > 0 else 0.0]),  # on a = 0
        np.array([max(float(y.mean()), 0.0), 0.0]),  # on b = 0
    ]
    best = min(candidates, key=lambda p: float(np.sum((y - design @ p) ** 2)))
    residual = float(np.sum((y - design @ best) ** 2))
    if len(x) <= 2:
        return float(best[0]), float("inf")
    covariance = residual / (len(x) - 2) * np.linalg.inv(design.T @ design)
    return float(best[0]), float(np.sqrt(max(covariance[0, 0], 0.0)))


def frechet_distance_extrapolated(generated: np.ndarray, reference: np.ndarray, *, min_samples: int = 20_000,
                                  max_samples: int = 50_000, num_batches: int = 20, num_points: int = 10,
                                  normalise: bool = True, seed: int = JETNET_SEED) -> tuple[float, float]:
    """Frechet physics distance as ``jetnet.evaluation.fpd`` defines it: (value, error).

    Why extrapolate: the Frechet distance of two finite samples is biased upwards by about
    features^2 / N; measured at several sizes N it falls on a line in 1/N whose intercept is
    the distance of the distributions. So: features normalised (:func:`jetnet_normalise`);
    for each of ``num_points`` batch sizes from ``min_samples`` to ``max_samples``
    (:func:`fpd_batch_sizes`), the mean Frechet distance of ``num_batches`` pairs of batches
    drawn with replacement (reference batch first, as JetNet draws its real sample first, from
    one ``np.random.default_rng(seed)``); the value is the intercept of the line fitted through
    (1/N, mean distance) and the error its standard error (:func:`fit_intercept`). Defaults
    are JetNet's (the CaloChallenge evaluation passes ``min_samples=10000``).
    """
    generated, reference = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    _check_samples(generated, reference)
    if not 2 <= min_samples < max_samples or num_points < 2 or num_batches < 1:
        raise ValueError(f"need 2 <= min_samples < max_samples, num_points >= 2 and num_batches >= 1, got "
                         f"{min_samples}, {max_samples}, {num_points}, {num_batches}")
    if normalise:
        generated, reference = jetnet_normalise(generated, reference)
    sizes = fpd_batch_sizes(min_samples, max_samples, num_points)
    rng = np.random.default_rng(seed)
    means = []
    for size in sizes:
        values = []
        for _ in range(num_batches):
            ref = reference[rng.choice(len(reference), size=size)]
            gen = generated[rng.choice(len(generated), size=size)]
            values.append(frechet_distance(ref, gen))
        means.append(np.mean(values))
    return fit_intercept(1.0 / sizes, np.array(means))


def _polynomial_kernel_sum(a: np.ndarray, b: np.ndarray, degree: int, skip_diagonal: bool) -> float:
    """Sum of (a_i . b_j / d + 1)^degree over all pairs (i != j when ``skip_diagonal``, a is b),
    :data:`KERNEL_BLOCK_ROWS` rows of ``a`` at a time."""
    d, total = a.shape[1], 0.0
    for start in range(0, len(a), KERNEL_BLOCK_ROWS):
        block = (a[start:start + KERNEL_BLOCK_ROWS] @ b.T / d + 1.0) ** degree
        if skip_diagonal:
            rows = np.arange(len(block))
            block[rows, start + rows] = 0.0
        total += float(block.sum())
    return total


def unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased estimate of MMD^2 between samples x (m, d) and y (n, d) with the polynomial
    kernel (a.b / d + 1)^degree: the means of k over pairs of distinct rows of x and of y,
    minus twice its mean over all (x, y) pairs."""
    m, n = len(x), len(y)
    xx = _polynomial_kernel_sum(x, x, degree, skip_diagonal=True) / (m * (m - 1))
    yy = _polynomial_kernel_sum(y, y, degree, skip_diagonal=True) / (n * (n - 1))
    return xx + yy - 2.0 * _polynomial_kernel_sum(x, y, degree, skip_diagonal=False) / (m * n)


#: Percentiles whose spread, halved, is JetNet's KPD error (the 1-sigma band of a Gaussian).
KPD_PERCENTILES = (16.275, 83.725)


def kernel_distance_jetnet(generated: np.ndarray, reference: np.ndarray, *, num_batches: int = 10,
                           batch_size: int = 5_000, degree: int = 4, normalise: bool = True,
                           seed: int = JETNET_SEED) -> tuple[float, float]:
    """Kernel physics distance as ``jetnet.evaluation.kpd`` defines it: (median, error).

    Features normalised (:func:`jetnet_normalise`); for batch i of ``num_batches``,
    ``batch_size`` rows of each sample drawn with replacement from
    ``np.random.default_rng(seed + 1000 i)`` (reference first), and the unbiased MMD^2 with the
    quartic kernel (a.b / d + 1)^4 (:func:`unbiased_mmd2`); the value is the median over
    batches and the error half the spread between their 16.275th and 83.725th percentiles
    (linear interpolation, as ``scipy.stats.iqr``), which resist a stray batch better than a
    mean and a standard deviation. Defaults are JetNet's (the CaloChallenge evaluation passes
    ``batch_size=10000``).
    """
    generated, reference = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    _check_samples(generated, reference)
    if batch_size < 2 or num_batches < 1:
        raise ValueError(f"need batch_size >= 2 and num_batches >= 1, got {batch_size}, {num_batches}")
    if normalise:
        generated, reference = jetnet_normalise(generated, reference)
    values = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + 1000 * i)
        ref = reference[rng.choice(len(reference), size=batch_size)]
        gen = generated[rng.choice(len(generated), size=batch_size)]
        values.append(unbiased_mmd2(ref, gen, degree))
    low, high = np.percentile(values, KPD_PERCENTILES)
    return float(np.median(values)), float((high - low) / 2.0)


def jetnet_settings(n_generated: int, n_reference: int) -> tuple[dict, dict, bool]:
    """(FPD settings, KPD settings, whether they are the CaloChallenge evaluation's) for samples
    of these sizes.

    With at least :data:`CALOCHALLENGE_MIN_SHOWERS` showers a side: :data:`CALOCHALLENGE_FPD`
    and :data:`CALOCHALLENGE_KPD`. With fewer, batches of 10000 to 50000 showers drawn with
    replacement would repeat each shower many times, cost as much as a full-size evaluation
    and still measure only the small samples; pcfm then scales the batches to the smaller
    sample (FPD from a fifth of it, at least 2, to all of it; KPD batches of all of it), and
    the numbers are not comparable with published ones.
    """
    fewest = min(n_generated, n_reference)
    if fewest >= CALOCHALLENGE_MIN_SHOWERS:
        return dict(CALOCHALLENGE_FPD), dict(CALOCHALLENGE_KPD), True
    fpd = dict(CALOCHALLENGE_FPD, min_samples=max(2, fewest // 5), max_samples=fewest)
    return fpd, dict(CALOCHALLENGE_KPD, batch_size=fewest), False


#: Added to layer and total energies (MeV) before log10, as the CaloChallenge evaluation does,
#: so that an empty layer gives -8 rather than -inf.
LOG_OFFSET_MEV = 1e-8


def calochallenge_distance_inputs(features: dict[str, np.ndarray], incident_energies: np.ndarray,
                                  layer_ids: list, angular_layer_ids: list) -> np.ndarray:
    """The CaloChallenge high-level classifier inputs, which its evaluation also feeds to FPD
    and KPD, from pcfm's features (:func:`pcfm.evaluation.features.high_level_features`): (N, F).

    Columns: log10 incident energy; log10(layer energy + 1e-8 MeV) of every layer; centres in
    x ("eta") and y ("phi"), then widths in x and y, each / 100 mm, of the layers binned in
    angle (``angular_layer_ids``: more than one angular bin); log10(total energy + 1e-8 MeV);
    the sparsity of every layer in the official sense (share of cells at zero, 1 minus pcfm's);
    centre and width in r / 100 mm of every layer. This is the column set of the evaluation code
    with total energy, sparsity and r (``prepare_high_data_for_classifier``); FPD and KPD do
    not depend on the column order.
    """
    incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    column = lambda name: np.asarray(features[name], dtype=np.float64)  # noqa: E731
    columns = [np.log10(incident)]
    columns += [np.log10(column(f"layer{i}_energy") + LOG_OFFSET_MEV) for i in layer_ids]
    for quantity in ("x_centre", "y_centre", "x_width", "y_width"):
        columns += [column(f"layer{i}_{quantity}") / 100.0 for i in angular_layer_ids]
    columns.append(np.log10(column("total_energy") + LOG_OFFSET_MEV))
    columns += [1.0 - column(f"layer{i}_sparsity") for i in layer_ids]
    for quantity in ("r_centre", "r_width"):
        columns += [column(f"layer{i}_{quantity}") / 100.0 for i in layer_ids]
    return np.stack(columns, axis=1)
