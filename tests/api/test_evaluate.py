"""Tests of the shower evaluation: features, distances, classifier test, report and sanity checks."""
import json
import re
import struct
import sys

import h5py
import numpy as np
import pytest

from pcfm.data.calochallenge import read_calochallenge, write_calochallenge
from pcfm.data.events import CaloShowers
from pcfm.errors import DataError, GeometryError
from pcfm.api import evaluate
from pcfm.evaluation import plots as plots_module
from pcfm.evaluation import report as report_module
from pcfm.evaluation.classifier import classifier_auc, roc_auc
from pcfm.evaluation.distances import (frechet_distance, frechet_distance_from_moments, histogram_edges,
                                       kernel_distance, normalised_histogram, separation_power,
                                       separation_powers, standardise)
from pcfm.evaluation.features import feature_matrix, high_level_features, low_level_inputs
from pcfm.geometry import get as get_geometry
from pcfm.geometry.cylindrical import CaloLayer, CylindricalGeometry, SamplingStructure
from pcfm.geometry.materials import get_material
from pcfm.sim.calo import simulate_showers

S = np.sqrt(0.5)  # cos(pi/4)


@pytest.fixture(scope="module")
def hand_geometry():
    """Layer 0: 4 angular x 2 radial bins (r centres 5, 15 mm); layer 5: one full ring at r = 15 mm."""
    silicon = SamplingStructure(sensor=get_material("Si"), sensor_mm=1.0)
    return CylindricalGeometry("hand-made", [CaloLayer(0, (0.0, 10.0, 20.0), 4, 0.0, silicon),
                                             CaloLayer(5, (0.0, 30.0), 1, 1.0, silicon)],
                               readout_threshold_mev=0.5)


def test_features_of_hand_made_showers(hand_geometry):
    cells = np.zeros((2, 9))
    # shower 0: alpha = pi/4 at r = 5 and alpha = -3pi/4 at r = 15 (2 MeV each), a cell under the
    # threshold and a negative cell (both zeroed), 4 MeV in layer 5
    cells[0, hand_geometry.cell_index(0, 2, 0)] = 2.0
    cells[0, hand_geometry.cell_index(0, 0, 1)] = 2.0
    cells[0, hand_geometry.cell_index(0, 1, 1)] = 0.3
    cells[0, hand_geometry.cell_index(0, 3, 1)] = -1.0
    cells[0, 8] = 4.0
    # shower 1: one cell at alpha = 3pi/4, r = 5; layer 5 empty
    cells[1, hand_geometry.cell_index(0, 3, 0)] = 1.0
    features = high_level_features(cells, np.array([10.0, 2.0]), hand_geometry)

    expected = {
        "total_energy": [8, 1], "energy_ratio": [0.8, 0.5],
        "layer0_energy": [4, 1], "layer0_x_centre": [-5 * S, -5 * S], "layer0_x_width": [10 * S, 0],
        "layer0_y_centre": [-5 * S, 5 * S], "layer0_y_width": [10 * S, 0],
        "layer0_r_centre": [10, 5], "layer0_r_width": [5, 0], "layer0_sparsity": [0.25, 0.125],
        "layer5_energy": [4, 0], "layer5_x_centre": [15, 0], "layer5_x_width": [0, 0],
        "layer5_y_centre": [0, 0], "layer5_y_width": [0, 0],
        "layer5_r_centre": [15, 0], "layer5_r_width": [0, 0], "layer5_sparsity": [1, 0],
    }
    assert list(features) == list(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(features[name], values, atol=1e-9, err_msg=name)
    inputs = low_level_inputs(cells, np.array([10.0, 2.0]), hand_geometry)
    assert inputs.shape == (2, 10)
    np.testing.assert_allclose(inputs[0, [2 * 2, 1, 3, 7, 8, 9]], [0.2, 0.2, 0.0, 0.0, 0.4, 1.0])


def test_features_in_blocks_match_one_pass():
    showers = simulate_showers("calochallenge-ds1-photons", 50, particle="photon", seed=3)
    geometry = get_geometry("calochallenge-ds1-photons")
    whole = high_level_features(showers.showers, showers.incident_energies, geometry)
    blocks = high_level_features(showers.showers, showers.incident_energies, geometry, block_events=7)
    assert len(whole) == 2 + 8 * geometry.n_layers
    for name in whole:
        np.testing.assert_allclose(blocks[name], whole[name], rtol=1e-12, err_msg=name)


def test_separation_power_hand_values():
    assert separation_power([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    assert separation_power([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    # 0.5 * (0.25 / 1.5 + 0.25 / 0.5) = 1/3
    assert separation_power([0.5, 0.5], [1.0, 0.0]) == pytest.approx(1.0 / 3.0)


def test_histograms_keep_outliers_and_handle_constant_features():
    np.testing.assert_allclose(normalised_histogram(np.array([-100.0, 0.5, 100.0]), np.array([0.0, 0.5, 1.0])),
                               [1 / 3, 2 / 3])
    np.testing.assert_allclose(histogram_edges(np.full(10, 2.0), n_bins=2), [1.5, 2.0, 2.5])
    powers = separation_powers({"a": np.full(10, 7.0), "b": np.arange(10.0)},
                               {"a": np.full(10, 2.0), "b": np.arange(10.0)}, n_bins=5)
    assert powers == {"a": pytest.approx(1.0), "b": 0.0}


def _rotation(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def test_frechet_distance_closed_form_for_gaussians():
    # Covariances sharing eigenvectors: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rotation = _rotation(4, 0)
    a, b = np.array([1.0, 4.0, 0.25, 0.0]), np.array([9.0, 1.0, 0.25, 2.0])  # one singular direction
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_moments(mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T)
    assert got == pytest.approx(expected, rel=1e-8)  # sqrt of a round-off eigenvalue ~1e-16 is ~1e-8
    # Non-commuting covariances: tr (S1 S2)^(1/2) is the sum of sqrt of the eigenvalues of S1 S2
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert frechet_distance_from_moments(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, rel=1e-9)
    # 1D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance_from_moments(1.0, 4.0, 3.0, 9.0) == pytest.approx(4.0 + 1.0)
    x = rng.normal(size=(200, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_kernel_distance_near_zero_for_same_distribution():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1000, 5)), rng.normal(size=(1000, 5))
    same, same_std = kernel_distance(x, y, seed=0)
    shifted, _ = kernel_distance(x, y + 0.3, seed=0)
    assert abs(same) < 0.03 and same_std > 0
    assert shifted > 0.2 > 10 * abs(same)
    with pytest.raises(ValueError, match="at least 4"):
        kernel_distance(x[:3], y)


def test_roc_auc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=300).astype(float)  # many ties
    labels = rng.random(300) < 0.4
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    assert roc_auc(scores, labels) == pytest.approx(pairs.mean(), rel=1e-12)
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([0.1, 0.2], [1, 1])


# --- sanity tests on simulated showers ------------------------------------------------------
@pytest.fixture(scope="module")
def photons():
    """Two independent samples of ds1 photons from the same simulator."""
    kwargs = dict(particle="photon", energy=(1e3, 1e5))
    return (simulate_showers("calochallenge-ds1-photons", 1500, seed=1, **kwargs),
            simulate_showers("calochallenge-ds1-photons", 1500, seed=2, **kwargs))


@pytest.fixture(scope="module")
def same_results(photons):
    return evaluate(*photons)


def test_same_simulator_is_indistinguishable(same_results):
    for level in ("low_level", "high_level"):
        assert 0.4 < same_results["classifier"][level]["auc"] < 0.6
    assert same_results["separation_power"]["mean"] < 0.02
    assert same_results["separation_power"]["max"] < 0.05
    assert abs(same_results["kpd"]) < 0.05


def test_scaled_energies_are_detected(photons, same_results):
    generated, reference = photons
    scaled = CaloShowers(generated.incident_energies, generated.showers * 1.3, generated.geometry)
    results = evaluate(scaled, reference)
    for level in ("low_level", "high_level"):
        assert results["classifier"][level]["auc"] > 0.8
    assert results["separation_power"]["per_feature"]["energy_ratio"] > 0.5
    assert results["separation_power"]["max"] > 10 * same_results["separation_power"]["max"]
    assert results["fpd"] > 5 * same_results["fpd"]
    assert results["kpd"] > 10 * max(same_results["kpd"], same_results["kpd_std"])


def test_shifted_longitudinal_profile_is_detected():
    geometry = get_geometry("calochallenge-ds2")
    reference = simulate_showers(geometry, 800, particle="photon", energy=(1e3, 1e5), seed=5)
    generated = simulate_showers(geometry, 800, particle="photon", energy=(1e3, 1e5), seed=6)
    shift = 3 * geometry.layers[0].n_cells  # three layers (about 2.5 X0) deeper
    shifted_cells = np.zeros_like(generated.showers)
    shifted_cells[:, shift:] = generated.showers[:, :-shift]
    shifted = CaloShowers(generated.incident_energies, shifted_cells, geometry.name)
    same = evaluate(generated, reference, classifier=False)
    moved = evaluate(shifted, reference, classifier=False)
    assert moved["separation_power"]["mean"] > 3 * same["separation_power"]["mean"]
    assert moved["separation_power"]["max"] > 5 * same["separation_power"]["max"]
    assert moved["fpd"] > 2 * same["fpd"]
    assert moved["kpd"] > 10 * max(abs(same["kpd"]), same["kpd_std"])
    # the high-level classifier alone (the low-level one needs more than 800 showers on 6480 cells)
    gen_std, ref_std = standardise(
        feature_matrix(high_level_features(shifted.showers, shifted.incident_energies, geometry)),
        feature_matrix(high_level_features(reference.showers, reference.incident_energies, geometry)))
    assert classifier_auc(gen_std, ref_std)["auc"] > 0.8


# --- input handling and reports -------------------------------------------------------------
def test_files_give_the_same_results_and_reports_are_written(tmp_path, photons, capsys):
    generated, reference = (p.subset(slice(0, 200)) for p in photons)
    write_calochallenge(tmp_path / "gen.h5", generated)
    write_calochallenge(tmp_path / "ref.h5", reference)
    in_memory = evaluate(generated, reference, classifier=False)
    from_files = evaluate(str(tmp_path / "gen.h5"), tmp_path / "ref.h5", classifier=False,
                          report_path=tmp_path / "out" / "report.json", plots_dir=tmp_path / "plots")
    assert from_files["geometry"] == "calochallenge-ds1-photons" and from_files["n_generated"] == 200
    assert from_files["separation_power"] == in_memory["separation_power"]
    assert from_files["fpd"] == pytest.approx(in_memory["fpd"], rel=1e-6)  # files hold the same values (float32 widened to float64)
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored["separation_power"]["per_feature"] == from_files["separation_power"]["per_feature"]
    assert stored["classifier"] is None
    summary = (tmp_path / "out" / "report.md").read_text()
    assert "calochallenge-ds1-photons" in summary and f"{from_files['fpd']:.4g}" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]  # no temp files
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert from_files["plots"] == [] and "matplotlib is not installed" in from_files["plots_skipped"]
        assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
        assert not (tmp_path / "plots").exists()
    else:
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
            f"{stem}.png" for stem in report_module.PLOT_CAPTIONS)


# --- plots ----------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _linked(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_plots_are_valid_pngs_and_linked(tmp_path, photons):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    generated, reference = (p.subset(slice(0, 300)) for p in photons)
    scaled = CaloShowers(generated.incident_energies, generated.showers * 1.3, generated.geometry)
    folder = tmp_path / "report"
    results = evaluate(scaled, reference, classifier=False, report_path=folder / "report.json", plots_dir=folder)
    pngs = sorted(folder.glob("*.png"))
    assert results["plots_skipped"] is None
    assert [p.name for p in pngs] == sorted(f"{stem}.png" for stem in report_module.PLOT_CAPTIONS)
    assert sorted(results["plots"]) == sorted(str(p) for p in pngs)
    for png in pngs:
        width, height = _png_size(png)
        assert width >= 500 and height >= 400 and png.stat().st_size > 20_000, png.name
        pixels = matplotlib_image.imread(png)[..., :3]
        assert (pixels.min(axis=2) < 0.5).mean() > 0.01, f"{png.name} is nearly blank"
        assert (np.abs(pixels - pixels[..., :1]).max(axis=2) > 0.3).any(), f"{png.name} lacks the orange generated curve"
    markdown = (folder / "report.md").read_text()
    assert sorted(_linked(markdown)) == [p.name for p in pngs]
    assert "Plots skipped" not in markdown
    assert sorted(p.name for p in folder.iterdir() if p.suffix not in (".png",)) == ["report.json", "report.md"]


def test_a_failing_figure_keeps_the_others(tmp_path, photons, monkeypatch):
    pytest.importorskip("matplotlib")

    def broken(*args, **kwargs):
        raise ValueError("test failure")

    # the two grids fail (also the slowest figures): the three profiles are still written and linked
    monkeypatch.setattr(plots_module, "_layer_grid_figure", broken)
    monkeypatch.setattr(plots_module, "_separating_figure", broken)
    generated, reference = (p.subset(slice(0, 100)) for p in photons)
    results = evaluate(generated, reference, classifier=False, report_path=tmp_path / "report.json",
                       plots_dir=tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["energy_response.png", "longitudinal_profile.png", "radial_profile.png"]
    assert results["plots_skipped"] == ("feature_histograms.png failed (ValueError: test failure); "
                                        "most_separating_features.png failed (ValueError: test failure)")
    markdown = (tmp_path / "report.md").read_text()
    assert sorted(_linked(markdown)) == pngs
    assert f"Plots skipped: {results['plots_skipped']}." in markdown


def test_report_without_matplotlib_says_why(tmp_path, photons, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    generated, reference = (p.subset(slice(0, 100)) for p in photons)
    results = evaluate(generated, reference, classifier=False, report_path=tmp_path / "out" / "report.json",
                       plots_dir=tmp_path / "out")
    assert results["plots"] == []
    assert re.match(r"matplotlib is not installed or does not import \((ImportError|ModuleNotFoundError): ",
                    results["plots_skipped"])
    assert "pip install matplotlib" in results["plots_skipped"]
    assert f"pcfm.evaluate: plots skipped: {results['plots_skipped']}" in capsys.readouterr().out
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"Plots skipped: {results['plots_skipped']}." in markdown and not _linked(markdown)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["plots_skipped"] == results["plots_skipped"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


def test_bad_inputs_name_the_sample_and_event(photons, tmp_path):
    generated, reference = (p.subset(slice(0, 20)) for p in photons)
    incident = generated.incident_energies.copy()
    incident[3] = 0.0
    with pytest.raises(DataError, match=r"^<in-memory data>: event 3: generated showers: incident energy must be "
                                        r"positive, finite and at most 1e\+07 MeV$"):
        evaluate(CaloShowers(incident, generated.showers, generated.geometry), reference, classifier=False)
    cells = reference.showers.copy()
    cells[7, 5] = np.nan
    with pytest.raises(DataError, match=r"event 7: reference showers: non-finite cell energy"):
        evaluate(generated, CaloShowers(reference.incident_energies, cells, reference.geometry), classifier=False)
    with pytest.raises(GeometryError, match="geometry 'calochallenge-ds2' contradicts the generated showers "
                                            r"\(in memory\), which name geometry 'calochallenge-ds1-photons'"):
        evaluate(generated, reference, "calochallenge-ds2", classifier=False)
    unnamed = [CaloShowers(s.incident_energies, s.showers) for s in (generated, reference)]
    with pytest.raises(DataError, match="showers have 368 cells but geometry 'calochallenge-ds2' has 6480"):
        evaluate(*unnamed, "calochallenge-ds2", classifier=False)
    with pytest.raises(GeometryError, match="cylindrical calorimeter geometry"):
        evaluate(generated, reference, "lartpc-768", classifier=False)
    write_calochallenge(tmp_path / "few.h5", generated.subset(slice(0, 3)))
    with pytest.raises(DataError, match=r"few\.h5: too few showers: the generated sample needs at least 4 showers, "
                                        r"got 3"):
        evaluate(tmp_path / "few.h5", reference, classifier=False)
    cells = reference.showers.copy()
    cells[9, 5] = 1e30
    with pytest.raises(DataError, match=r"event 9: reference showers: cell energy above 1e\+07 MeV \(10 TeV\), "
                                        r"out of range"):
        evaluate(generated, CaloShowers(reference.incident_energies, cells, reference.geometry), classifier=False)


# --- geometries the samples name, and small samples ------------------------------------------
@pytest.fixture(scope="module")
def dataset2_mesh_files(tmp_path_factory):
    """Two small files on the 6480-cell mesh: one named calochallenge-ds2, one par04-scipb."""
    folder = tmp_path_factory.mktemp("mesh")
    paths = {}
    for name, seed in (("calochallenge-ds2", 1), ("par04-scipb", 2)):
        paths[name] = folder / f"{name}.h5"
        write_calochallenge(paths[name], simulate_showers(name, 8, energy=(1e3, 1e4), seed=seed))
    return paths


def test_samples_of_different_geometries_are_refused_unless_allowed(dataset2_mesh_files, tmp_path):
    """ds2 against par04-scipb (both 6480 cells) was once evaluated silently as ds2."""
    ds2, scipb = dataset2_mesh_files["calochallenge-ds2"], dataset2_mesh_files["par04-scipb"]
    both = (rf"the generated showers \({re.escape(str(ds2))}\) name geometry 'calochallenge-ds2' but the reference "
            rf"showers \({re.escape(str(scipb))}\) name 'par04-scipb': different detectors; pass "
            r"allow_geometry_mismatch=True")
    with pytest.raises(GeometryError, match=both):
        evaluate(ds2, scipb, classifier=False, progress=False)
    with pytest.raises(GeometryError, match=rf"geometry 'par04-scipb' contradicts the generated showers "
                                            rf"\({re.escape(str(ds2))}\), which name geometry 'calochallenge-ds2'"):
        evaluate(ds2, ds2, "par04-scipb", classifier=False, progress=False)
    in_memory = read_calochallenge(ds2)
    with pytest.raises(GeometryError, match=r"generated showers \(in memory\) name geometry 'calochallenge-ds2'"):
        evaluate(in_memory, scipb, classifier=False, progress=False)
    # a file that names no geometry is read as the preset of its cell count: ds2 for 6480 cells
    unnamed = tmp_path / "unnamed.h5"
    with h5py.File(unnamed, "w") as f:
        f["incident_energies"] = in_memory.incident_energies.reshape(-1, 1)
        f["showers"] = in_memory.showers
    with pytest.raises(GeometryError, match=r"are read by default \(by their cell count\) as geometry "
                                            r"'calochallenge-ds2' "
                                            r"but .* name 'par04-scipb'.*give geometry= \(--geometry\)"):
        evaluate(unnamed, scipb, classifier=False, progress=False)
    assert evaluate(unnamed, scipb, "par04-scipb", classifier=False, progress=False)["geometry"] == "par04-scipb"

    allowed = evaluate(ds2, scipb, classifier=False, progress=False, allow_geometry_mismatch=True)
    assert allowed["geometry"] == "par04-scipb"  # the reference's
    assert "both evaluated as 'par04-scipb' (allow_geometry_mismatch)" in allowed["warnings"][0]
    forced = evaluate(ds2, scipb, "calochallenge-ds2", classifier=False, progress=False, allow_geometry_mismatch=True)
    assert forced["geometry"] == "calochallenge-ds2" and "contradicts the reference showers" in forced["warnings"][0]
    same = evaluate(ds2, ds2, classifier=False, progress=False)
    assert same["geometry"] == "calochallenge-ds2" and not any("geometr" in w for w in same["warnings"])


def test_small_samples_give_finite_distances_and_say_why_they_are_weak():
    """12 against 12 ds2 showers gave FPD 1.4e17 and KPD -1.9e19: a layer with one hit cell had a width of
    sqrt(round-off) ~1e-7 mm, and the standardisation divided by its spread."""
    generated = simulate_showers("calochallenge-ds2", 12, seed=6)
    reference = simulate_showers("calochallenge-ds2", 12, seed=7)
    results = evaluate(generated, reference, classifier=False, progress=False)
    assert np.isfinite(results["fpd"]) and results["fpd"] < 1e4
    assert np.isfinite(results["kpd"]) and abs(results["kpd"]) < 100
    assert all(np.isfinite(results[key][part]) for key in ("fpd_jetnet", "kpd_jetnet") for part in ("value", "error"))
    assert results["warnings"] == [
        "FPD and KPD on 12 generated and 12 reference showers of 362 features: the covariances are singular and "
        "the Frechet distance is dominated by its small-sample bias (of order 362^2 / showers); compare only "
        "evaluations of equal sizes, and use at least 363 showers a side for full-rank estimates",
        "JetNet FPD and KPD on 12 generated and 12 reference showers: the CaloChallenge evaluation uses at least "
        "10000 a side (FPD batches of 10000 to 50000 showers, KPD batches of 10000); pcfm scaled the batches to "
        "the samples, so these values are not comparable with published ones"]
    assert "Warning: FPD and KPD on 12 generated" in report_module.markdown_summary(results)


def test_one_hit_cell_has_width_zero_and_round_off_columns_are_not_blown_up():
    geometry = get_geometry("calochallenge-ds2")
    rng = np.random.default_rng(0)
    cells = np.zeros((50, geometry.n_cells), np.float32)
    for k in range(50):  # one cell of random energy per shower
        cells[k, geometry.cell_index(int(rng.integers(45)), int(rng.integers(16)), int(rng.integers(9)))] = \
            rng.uniform(0.1, 5e4)
    features = high_level_features(cells, np.full(50, 1e5), geometry)
    widths = np.concatenate([v for name, v in features.items() if name.endswith("_width")])
    assert np.count_nonzero(widths) == 0  # was up to 5e-7 mm
    # a reference column constant up to round-off is scaled by the spread of both samples together
    reference = np.array([[0.0], [1e-9], [0.0], [2e-9]])
    generated = np.array([[3.0], [4.0], [5.0], [0.0]])
    gen_std, ref_std = standardise(generated, reference)
    pooled = np.concatenate([generated, reference]).std()
    np.testing.assert_allclose(gen_std[:, 0], (generated[:, 0] - reference.mean()) / pooled)
    assert np.abs(gen_std).max() < 10
    np.testing.assert_allclose(standardise(np.ones((3, 1)), np.ones((3, 1)))[0], 0.0)  # constant in both: shifted


# --- FPD and KPD as JetNet defines them ------------------------------------------------------
def test_jetnet_distances_are_reported_beside_pcfm_ones(same_results, photons):
    """pcfm's keys stay; the JetNet ones say what they were computed on and that 1500 showers a side
    are too few to set them beside published values."""
    for key in ("fpd", "kpd", "kpd_std"):
        assert isinstance(same_results[key], float)
    fpd, kpd = same_results["fpd_jetnet"], same_results["kpd_jetnet"]
    assert not fpd["comparable"] and not kpd["comparable"]
    assert fpd["settings"] == {"min_samples": 300, "max_samples": 1500, "num_batches": 20, "num_points": 10,
                               "seed": 42}
    assert kpd["settings"] == {"num_batches": 10, "batch_size": 1500, "seed": 42, "degree": 4}
    # ds1 photons: 5 layers, 2 of them binned in angle: 1 + 5 + 4 * 2 + 1 + 5 + 2 * 5 columns
    assert fpd["n_features"] == 30 and "log10 E_inc" in fpd["features"]
    assert any(w.startswith("JetNet FPD and KPD on 1500 generated and 1500 reference showers") for w in
               same_results["warnings"])
    # the wrong particle stands out (the log-scaled features, divided by their largest |value|, hardly
    # see a 1.3 x energy scale at this size: FPD 0.0081 +- 0.0015 against 0.0065 +- 0.0013)
    reference = photons[1].subset(slice(0, 500))
    same = evaluate(photons[0].subset(slice(0, 500)), reference, classifier=False, progress=False)
    pions = simulate_showers("calochallenge-ds1-photons", 500, particle="pion", energy=(1e3, 1e5), seed=3)
    wrong = evaluate(pions, reference, classifier=False, progress=False)
    for key in ("fpd_jetnet", "kpd_jetnet"):
        assert wrong[key]["value"] > same[key]["value"] + 5 * (same[key]["error"] + wrong[key]["error"]), key
    summary = report_module.markdown_summary(same_results)
    assert "| FPD, JetNet definition (x 10^3) |" in summary and "not comparable with published" in summary


# --- files the CaloChallenge evaluation accepts: negative cells, empty showers ---------------
def _write_raw(path, showers, geometry="calochallenge-ds1-photons"):
    """A CaloChallenge file as a generator may write it (write_calochallenge refuses bad events)."""
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = geometry
        f["incident_energies"] = showers.incident_energies.astype(np.float64).reshape(-1, 1)
        f["showers"] = showers.showers.astype(np.float32)


@pytest.fixture
def odd_files(photons, tmp_path):
    """A generated file with two tiny negative cells (events 3 and 5) and an empty shower (event 7),
    event 9 holding nothing but a negative cell; and a clean reference file."""
    generated, reference = (p.subset(slice(0, 100)) for p in photons)
    cells = generated.showers.copy()
    cells[3, 10] = -1e-6
    cells[5, 20] = -2e-6
    cells[7] = 0.0
    cells[9] = 0.0
    cells[9, 30] = -5e-7
    odd = CaloShowers(generated.incident_energies, cells, generated.geometry)
    _write_raw(tmp_path / "gen.h5", odd)
    write_calochallenge(tmp_path / "ref.h5", reference)
    return tmp_path / "gen.h5", tmp_path / "ref.h5", odd, reference


def test_negative_cells_and_empty_showers_are_refused_naming_the_option(odd_files):
    gen, ref, _, _ = odd_files
    with pytest.raises(DataError, match=rf"^{re.escape(str(gen))}: event 3: negative cell energy -1e-06 MeV in cell "
                                        r"10; pass clip_negative=True \(pcfm evaluate --clip-negative\)"):
        evaluate(gen, ref, classifier=False, progress=False)
    with pytest.raises(DataError, match=rf"{re.escape(str(gen))}: event 7: empty shower: all 368 cells are zero; "
                                        r"pass keep_empty=True \(pcfm evaluate --keep-empty\)"):
        evaluate(gen, ref, clip_negative=True, classifier=False, progress=False)
    with pytest.raises(DataError, match=r"event 3: negative cell energy"):
        evaluate(gen, ref, keep_empty=True, classifier=False, progress=False)


def test_clip_negative_and_keep_empty_read_them_and_count_them(odd_files, tmp_path):
    gen, ref, odd, reference = odd_files
    results = evaluate(gen, ref, clip_negative=True, keep_empty=True, classifier=False, progress=False,
                       report_path=tmp_path / "out" / "report.json")
    assert results["n_generated"] == 100 and results["inputs"]["clip_negative"] and results["inputs"]["keep_empty"]
    assert results["inputs"]["generated"] == {"source": str(gen), "negative_cells": 3,
                                              "negative_energy_mev": pytest.approx(-3.5e-6, rel=1e-6),
                                              "empty_showers": 2}
    assert results["inputs"]["reference"] == {"source": str(ref), "negative_cells": 0, "negative_energy_mev": 0.0,
                                              "empty_showers": 0}
    assert "generated showers: 3 negative cells (summing to -3.5e-06 MeV) counted as 0" in results["warnings"]
    assert "generated showers: 2 empty showers (no non-zero cell) kept, their features 0" in results["warnings"]
    assert np.isfinite([results["fpd"], results["kpd"], results["fpd_jetnet"]["value"],
                        results["kpd_jetnet"]["value"]]).all()
    # the same as the clipped showers in memory: a clipped cell is a zero cell
    clipped = CaloShowers(odd.incident_energies, np.clip(odd.showers, 0, None), odd.geometry)
    in_memory = evaluate(clipped, reference, classifier=False, progress=False)
    assert results["separation_power"] == in_memory["separation_power"]
    assert results["fpd_jetnet"]["value"] == pytest.approx(in_memory["fpd_jetnet"]["value"], rel=1e-6)
    # empty showers have features 0
    features = high_level_features(np.zeros((1, 368)), np.array([1e4]), get_geometry("calochallenge-ds1-photons"))
    assert all(np.all(v == 0) for v in features.values())
    summary = (tmp_path / "out" / "report.md").read_text()
    assert f"| generated ({gen}) | 3 | -3.5e-06 | 2 |" in summary


def test_in_memory_showers_are_counted_and_clipped_on_request(odd_files):
    _, _, odd, reference = odd_files
    kept = evaluate(odd, reference, classifier=False, progress=False)  # in memory: accepted as before
    assert kept["inputs"]["generated"]["negative_cells"] == 3 and kept["inputs"]["generated"]["empty_showers"] == 2
    clipped = evaluate(odd, reference, clip_negative=True, classifier=False, progress=False)
    assert clipped["separation_power"] == kept["separation_power"]  # the features zero negative cells either way
    assert odd.showers.min() < 0  # the caller's showers are not changed
