"""FPD and KPD as JetNet defines them (pcfm.evaluation.distances), on hand-computed cases."""
import numpy as np
import pytest

from pcfm.evaluation import distances
from pcfm.evaluation.distances import (CALOCHALLENGE_FPD, CALOCHALLENGE_KPD, calochallenge_distance_inputs,
                                       fit_intercept, fpd_batch_sizes, frechet_distance,
                                       frechet_distance_extrapolated, jetnet_normalise, jetnet_settings,
                                       kernel_distance_jetnet, unbiased_mmd2)


# --- the 1/N extrapolation ---------------------------------------------------------------------
def test_batch_sizes_are_even_in_one_over_n_and_truncated_as_jetnet_does():
    sizes = fpd_batch_sizes(10_000, 50_000, 10)
    assert sizes[0] == 10_000 and sizes[-1] == 49_999  # 1 / (1 / 50000) is 49999.99...
    np.testing.assert_allclose(np.diff(1.0 / sizes), np.diff(1.0 / sizes).mean(), rtol=1e-3)


def test_fit_recovers_a_known_intercept():
    inverse = 1.0 / np.array([100.0, 150.0, 200.0, 400.0, 1000.0])
    value, error = fit_intercept(inverse, 0.3 + 20.0 * inverse)
    assert value == pytest.approx(0.3, rel=1e-10) and error < 1e-10
    # the bounds a, b >= 0: a line that would cross below 0 at N -> infinity gives 0
    assert fit_intercept(inverse, -0.05 + 20.0 * inverse)[0] == 0.0
    # a falling line gives slope 0 and the mean as the intercept
    falling = 0.3 - 20.0 * inverse
    assert fit_intercept(inverse, falling)[0] == pytest.approx(falling.mean())
    assert fit_intercept(inverse[:2], 0.3 + 20.0 * inverse[:2])[1] == float("inf")  # no residual degree of freedom


@pytest.mark.parametrize("offset, slope", [(0.3, 20.0), (-0.05, 20.0), (0.3, -20.0)])
def test_fit_matches_scipy_curve_fit_with_jetnet_bounds(offset, slope):
    optimize = pytest.importorskip("scipy.optimize")
    inverse = 1.0 / np.array([100.0, 150.0, 200.0, 300.0, 500.0, 1000.0])
    values = offset + slope * inverse + np.random.default_rng(0).normal(0.0, 1e-3, len(inverse))
    params, covariance = optimize.curve_fit(lambda x, a, b: a + b * x, inverse, values,
                                            bounds=([0, 0], [np.inf, np.inf]))
    value, error = fit_intercept(inverse, values)
    assert value == pytest.approx(params[0], abs=1e-7)
    assert error == pytest.approx(np.sqrt(covariance[0, 0]), rel=1e-5)


# --- FPD -----------------------------------------------------------------------------------------
def test_fpd_of_one_dimensional_gaussians():
    """FD of N(mu1, s1^2) and N(mu2, s2^2) is (mu1 - mu2)^2 + (s1 - s2)^2 = 1 + 1 here. Batches drawn
    with replacement from fixed samples extrapolate to the FD of those samples."""
    rng = np.random.default_rng(0)
    reference, generated = rng.normal(0.0, 1.0, (20_000, 1)), rng.normal(1.0, 2.0, (20_000, 1))
    value, error = frechet_distance_extrapolated(generated, reference, min_samples=500, max_samples=5000,
                                                 normalise=False)
    assert value == pytest.approx(2.0, abs=0.1)
    assert abs(value - frechet_distance(generated, reference)) < max(4 * error, 0.02)
    assert 0 < error < 0.05


def test_fpd_normalises_by_the_reference_and_is_seeded():
    rng = np.random.default_rng(1)
    reference, generated = rng.normal(0.0, 1.0, (2000, 3)), rng.normal(0.2, 1.0, (2000, 3))
    kwargs = dict(min_samples=100, max_samples=1000, num_batches=5, num_points=5)
    raw = frechet_distance_extrapolated(generated, reference, normalise=False, **kwargs)
    # one common factor on every column: normalising divides the squared distance by its square
    scale = np.abs(reference).max()
    scaled = frechet_distance_extrapolated(generated / scale, reference / scale, normalise=False, **kwargs)
    # columns of different scales: the normalised distance is unchanged by rescaling a column
    stretch = np.array([1.0, 1e3, 1e-3])
    normalised = frechet_distance_extrapolated(generated, reference, **kwargs)
    stretched = frechet_distance_extrapolated(generated * stretch, reference * stretch, **kwargs)
    assert normalised == pytest.approx(stretched, rel=1e-9)
    assert scaled[0] == pytest.approx(raw[0] / scale ** 2, rel=1e-9)
    assert frechet_distance_extrapolated(generated, reference, **kwargs) == normalised  # same seed, same value
    assert frechet_distance_extrapolated(generated, reference, seed=7, **kwargs) != normalised
    gen_n, ref_n = jetnet_normalise(generated * stretch, reference * stretch)
    np.testing.assert_allclose(np.abs(ref_n).max(axis=0), 1.0)
    np.testing.assert_allclose(jetnet_normalise(np.ones((3, 1)), np.zeros((3, 1)))[0], 1.0)  # zero column: as is


def test_fpd_of_a_sample_with_itself_is_near_zero():
    x = np.random.default_rng(2).normal(size=(3000, 4))
    value, error = frechet_distance_extrapolated(x, x, min_samples=200, max_samples=2000)
    assert value <= max(3 * error, 1e-3)


def test_fpd_refuses_bad_settings():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="min_samples < max_samples"):
        frechet_distance_extrapolated(x, x, min_samples=100, max_samples=100)
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance_extrapolated(x[:1], x)
    with pytest.raises(ValueError, match="3 and 2 features"):
        frechet_distance_extrapolated(np.zeros((10, 3)), x)


# --- KPD -----------------------------------------------------------------------------------------
def test_unbiased_mmd2_by_hand():
    """x = (0, 1), y = (2, 3), d = 1, k(a, b) = (ab + 1)^4: pairs of distinct x give k = 1, of
    distinct y 7^4 = 2401; the cross pairs 1, 1, 3^4, 4^4 average 84.75; MMD^2 = 1 + 2401 - 169.5."""
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert unbiased_mmd2(x, y) == pytest.approx(2232.5)
    assert unbiased_mmd2(x, y, degree=3) == pytest.approx(1.0 + 343.0 - 2.0 * (1 + 1 + 27 + 64) / 4)


def test_unbiased_mmd2_in_blocks_matches_one_pass(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 3)), rng.normal(0.5, 1.0, size=(40, 3))
    whole = unbiased_mmd2(x, y)
    monkeypatch.setattr(distances, "KERNEL_BLOCK_ROWS", 7)
    assert unbiased_mmd2(x, y) == pytest.approx(whole, rel=1e-12)


def test_kpd_is_the_median_and_half_the_16_84_percent_spread(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    batch_values = iter([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.0])
    monkeypatch.setattr(distances, "unbiased_mmd2", lambda x, y, degree: next(batch_values))
    x = np.ones((5, 2))
    value, error = kernel_distance_jetnet(x, x, num_batches=7, batch_size=3)
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.0]
    assert value == 3.0
    assert error == pytest.approx(stats.iqr(values, rng=(16.275, 83.725)) / 2)


def test_kpd_near_zero_for_one_distribution_and_seeded():
    rng = np.random.default_rng(4)
    reference, same, shifted = rng.normal(size=(3000, 5)), rng.normal(size=(3000, 5)), rng.normal(0.5, 1.0, (3000, 5))
    value, error = kernel_distance_jetnet(same, reference, batch_size=1000)
    far, far_error = kernel_distance_jetnet(shifted, reference, batch_size=1000)
    assert abs(value) < 3 * error + 1e-4
    assert far > 20 * (abs(value) + error) and far > 5 * far_error
    assert kernel_distance_jetnet(same, reference, batch_size=1000) == (value, error)
    assert kernel_distance_jetnet(same, reference, batch_size=1000, seed=1) != (value, error)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        kernel_distance_jetnet(same, reference, batch_size=1)


# --- what the CaloChallenge evaluation feeds them ---------------------------------------------
def test_settings_are_the_calochallenge_ones_from_10000_showers():
    fpd, kpd, comparable = jetnet_settings(10_000, 20_000)
    assert comparable and fpd == CALOCHALLENGE_FPD and kpd == CALOCHALLENGE_KPD
    assert fpd == {"min_samples": 10_000, "max_samples": 50_000, "num_batches": 20, "num_points": 10}
    assert kpd == {"num_batches": 10, "batch_size": 10_000}
    fpd, kpd, comparable = jetnet_settings(9_999, 20_000)
    assert not comparable and (fpd["min_samples"], fpd["max_samples"], kpd["batch_size"]) == (1999, 9999, 9999)
    fpd, kpd, _ = jetnet_settings(4, 4)
    assert (fpd["min_samples"], fpd["max_samples"], kpd["batch_size"]) == (2, 4, 4)


def test_calochallenge_inputs_from_pcfm_features():
    """Two layers, only layer 0 binned in angle; shower 1 is empty (its log energies are log10(1e-8))."""
    features = {"total_energy": np.array([300.0, 0.0])}
    for layer, energy in ((0, 100.0), (2, 200.0)):
        features.update({f"layer{layer}_energy": np.array([energy, 0.0]),
                         f"layer{layer}_sparsity": np.array([0.25, 0.0])})
        for quantity, value in (("x_centre", 10.0), ("y_centre", -20.0), ("x_width", 30.0), ("y_width", 40.0),
                                ("r_centre", 50.0), ("r_width", 60.0)):
            features[f"layer{layer}_{quantity}"] = np.array([value + layer, 0.0])
    inputs = calochallenge_distance_inputs(features, np.array([1e3, 1e4]), [0, 2], [0])
    expected = [[3.0, np.log10(100 + 1e-8), np.log10(200 + 1e-8), 0.10, -0.20, 0.30, 0.40, np.log10(300 + 1e-8),
                 0.75, 0.75, 0.50, 0.52, 0.60, 0.62],
                [4.0, -8.0, -8.0, 0, 0, 0, 0, -8.0, 1.0, 1.0, 0, 0, 0, 0]]
    np.testing.assert_allclose(inputs, expected, atol=1e-12)
