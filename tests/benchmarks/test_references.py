"""benchmarks/references.py: the simple (no-network) references of the transfer benchmark.

Feature shapes, names and finiteness; known answers (a shower all in one layer, two opposite
prongs, a straight line of points, two separate blobs); hyper-parameters chosen on validation,
never on the test set; a pid classifier beats chance; segmentation and the command line run.
"""
import json
import math
import re
import sys
import time

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from tests.benchmark_loader import load_benchmark  # noqa: E402
from tests.conftest import PROJECT_ROOT, SHARED_DATA  # noqa: E402

ref = load_benchmark("references")
GEANT4 = SHARED_DATA / "geant4"


@pytest.fixture(scope="module")
def pid_events():
    return ref.simulate_events("pid", 240, seed=7)


@pytest.fixture(scope="module")
def lartpc_events():
    return ref.simulate_events("segmentation", 16, seed=5)


def shower(geometry, cells, energies, incident=1e4):
    """A point cloud of the given cells of ``geometry`` (positions from the geometry)."""
    cells = np.asarray(cells, dtype=np.int64)
    return Data(pos=torch.from_numpy(geometry.centers(cells).astype(np.float32)),
                energy=torch.tensor(energies, dtype=torch.float32), cell=torch.from_numpy(cells),
                incident_energy=torch.tensor([incident]), geometry=geometry.name)


def column(names, name):
    return names.index(name)


# ----------------------------------------------------------------------------- shower features


def test_shower_features_shape_names_and_finite(pid_events):
    X = ref.shower_features(pid_events[:50], "par04-scipb")
    names = ref.shower_feature_names(45, use_incident_energy=True)
    assert X.shape == (50, len(names)) == (50, len(ref.SHOWER_FEATURE_NAMES))
    assert tuple(names) == ref.SHOWER_FEATURE_NAMES and len(set(names)) == len(names)
    assert 230 <= len(names) <= 300
    assert np.isfinite(X).all()
    without = ref.shower_features(pid_events[:50], use_incident_energy=False)  # geometry from the events
    assert without.shape == (50, len(names) - 1)
    np.testing.assert_allclose(without, X[:, :-1])
    np.testing.assert_allclose(np.exp(X[:, -1]), [float(e.incident_energy) for e in pid_events[:50]], rtol=1e-5)


def test_shower_all_in_layer_three_and_an_empty_shower():
    from pcfm import geometry as geometries

    geo = geometries.get("calochallenge-ds2")
    cells = geo.cell_index([3] * 4, [0, 4, 8, 12], [1] * 4)  # a ring of four cells 90 degrees apart
    empty = Data(pos=torch.zeros(0, 3), energy=torch.zeros(0), cell=torch.zeros(0, dtype=torch.long),
                 incident_energy=torch.tensor([1e4]), geometry=geo.name)
    X = ref.shower_features([shower(geo, cells, [5.0] * 4), empty], geo)
    names = ref.shower_feature_names(geo.n_layers)
    row = X[0]
    assert row[column(names, "layer3/log_frac")] == pytest.approx(math.log(1 + ref.FRACTION_FLOOR))
    assert row[column(names, "layer2/log_frac")] == pytest.approx(math.log(ref.FRACTION_FLOOR))
    assert row[column(names, "layer3/log_hits")] == pytest.approx(math.log(5))
    assert row[column(names, "first_layer_1pct")] == 3 and row[column(names, "first_layer_hit")] == 3
    assert row[column(names, "max_layer")] == 3
    assert row[column(names, "depth_centroid")] == pytest.approx(3) and row[column(names, "depth_spread")] == pytest.approx(0)
    assert row[column(names, "frac_first3")] == 0 and row[column(names, "frac_first5")] == pytest.approx(1)
    assert row[column(names, "log_visible_energy")] == pytest.approx(math.log(20))
    r_mid = 1.5 * geo.layers[3].r_edges_mm[1]  # middle of radial bin 1
    assert row[column(names, "layer3/r_mean")] == pytest.approx(r_mid, rel=1e-5)
    assert row[column(names, "layer3/r_rms")] == pytest.approx(0, abs=1e-3)
    assert row[column(names, "layer3/xy_eig_ratio")] == pytest.approx(1)  # four-fold symmetric: round
    assert row[column(names, "layer3/xy_asymmetry")] == pytest.approx(0, abs=1e-6)
    assert row[column(names, "hits")] == 4
    assert np.all(X[1] == 0)  # an empty shower: zeros, no NaN


def test_two_opposite_prongs_read_as_elongated_and_one_side_as_asymmetric():
    from pcfm import geometry as geometries

    geo = geometries.get("calochallenge-ds2")
    names = ref.shower_feature_names(geo.n_layers)
    prongs = shower(geo, geo.cell_index([5, 5], [0, 8], [0, 0]), [3.0, 3.0])  # alpha bins 180 degrees apart
    side = shower(geo, geo.cell_index([5], [2], [0]), [3.0])
    X = ref.shower_features([prongs, side], geo)
    assert X[0, column(names, "layer5/xy_eig_ratio")] == pytest.approx(0, abs=1e-6)
    assert X[0, column(names, "layer5/xy_asymmetry")] == pytest.approx(0, abs=1e-6)
    assert X[1, column(names, "layer5/xy_asymmetry")] == pytest.approx(1)


def test_points_without_a_cell_are_placed_by_depth():
    from pcfm import geometry as geometries

    geo = geometries.get("calochallenge-ds2")
    cell = geo.cell_index([7], [3], [2])
    event = shower(geo, cell, [2.0])
    event.cell = torch.tensor([-1])
    names = ref.shower_feature_names(geo.n_layers)
    assert ref.shower_features([event], geo)[0, column(names, "first_layer_hit")] == 7


# ----------------------------------------------------------------------------- point features


def lartpc_cloud(pos, energy=None):
    pos = np.asarray(pos, dtype=np.float32)
    energy = np.ones(len(pos), np.float32) if energy is None else np.asarray(energy, np.float32)
    return Data(pos=torch.from_numpy(pos), energy=torch.from_numpy(energy),
                semantic=torch.zeros(len(pos), dtype=torch.long))


def test_point_features_shape_names_finite_and_fast(lartpc_events):
    names = ref.POINT_FEATURE_NAMES
    assert 20 <= len(names) <= 30 and len(set(names)) == len(names)
    for event in lartpc_events[:4]:
        X = ref.point_features(event)
        assert X.shape == (event.num_nodes, len(names)) and np.isfinite(X).all()
    assert ref.point_features(lartpc_cloud(np.zeros((0, 3)))).shape == (0, len(names))
    assert np.isfinite(ref.point_features(lartpc_cloud([[0, 0, 0]]))).all()  # a single point
    # a 10k-point event: a cloud of tracks and blobs built from the simulated events
    big = torch.cat([e.pos + 300 * i for i, e in enumerate(lartpc_events)])[:10_000]
    cloud = lartpc_cloud(big.numpy())
    start = time.perf_counter()
    ref.point_features(cloud)
    assert time.perf_counter() - start < 2.0  # about 0.1 s on one core


def test_straight_line_is_linear_and_two_blobs_are_two_fragments():
    pitch = 3.0
    line = np.stack([np.arange(40) * pitch, np.zeros(40), np.zeros(40)], 1)
    rng = np.random.default_rng(0)
    blob_a = rng.integers(0, 4, size=(200, 3)) * pitch  # a 4x4x4 voxel cube (duplicates allowed)
    blob_b = rng.integers(0, 3, size=(60, 3)) * pitch + 500.0
    names = ref.POINT_FEATURE_NAMES
    X = ref.point_features(lartpc_cloud(line), pitch_mm=pitch)
    inner = slice(10, 30)
    assert np.all(X[inner, names.index("linearity")] > 0.99)
    assert np.allclose(X[:, names.index("direction_x")], 1)
    assert np.all(X[:, names.index("fragment_points")] == 40)
    assert X[0, names.index("fragment_linearity")] > 0.99
    assert X[0, names.index("fragment_extent")] == pytest.approx(39 * pitch)
    assert X[0, names.index("fragment_far_end")] == pytest.approx(1) and X[0, names.index("fragment_near_end")] == 0
    assert X[20, names.index("fragment_far_end")] == pytest.approx(20 / 39)
    assert np.allclose(X[:, names.index("fragment_axis_distance")], 0, atol=1e-6)
    assert X[20, names.index("neighbours_1.5")] == 2 and X[20, names.index("neighbours_3")] == 6

    X = ref.point_features(lartpc_cloud(np.concatenate([blob_a, blob_b]), np.r_[np.ones(200), 2 * np.ones(60)]),
                           pitch_mm=pitch)
    sizes, energies = X[:, names.index("fragment_points")], X[:, names.index("fragment_energy")]
    assert np.all(sizes[:200] == 200) and np.all(sizes[200:] == 60)
    assert np.allclose(energies[:200], 200) and np.allclose(energies[200:], 120)
    assert np.allclose(X[:200, names.index("fragment_energy_fraction")], 200 / 320)
    assert np.allclose(X[:, names.index("event_log_points")], math.log(260))


# ----------------------------------------------------------------------------- fitting


def gaussian_classes(n, rng, shift=1.5, dims=5):
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, dims))
    X[:, 0] += shift * y
    return X, y


def test_hyper_parameters_are_chosen_on_validation_not_test():
    rng = np.random.default_rng(0)
    train, val, test = (gaussian_classes(n, rng) for n in (60, 60, 200))
    first = ref.classify(*train, *val, *test, seed=0)
    flipped = ref.classify(*train, *val, test[0], 1 - test[1], seed=0)
    for model in ("logistic", "boosted"):
        assert first[model]["params"] == flipped[model]["params"]
        assert first[model]["val_accuracy"] == flipped[model]["val_accuracy"]
        assert first[model]["test"]["accuracy"] == pytest.approx(1 - flipped[model]["test"]["accuracy"])
        assert first[model]["test"]["accuracy"] > 0.65 and 0.5 < first[model]["test"]["roc_auc"] <= 1
    assert first["best"]["model"] == flipped["best"]["model"]
    assert first["best"]["model"] == max(("logistic", "boosted"),
                                         key=lambda m: (first[m]["val_accuracy"], m == "logistic"))
    assert first["logistic"]["params"]["C"] in ref.C_GRID

    # the chosen setting is the one of highest validation accuracy, refitted here by hand
    scores = {}
    for penalty in ref.LOGISTIC_PENALTIES:
        for C in ref.C_GRID:
            model = ref._linear_pipeline(ref._logistic_regression(C, penalty)).fit(*train)
            scores[(penalty, C)] = np.mean(model.predict(val[0]) == val[1])
    chosen = first["logistic"]["params"]
    assert scores[(chosen["penalty"], chosen["C"])] == max(scores.values()) == first["logistic"]["val_accuracy"]


def test_energy_regression_chosen_on_validation():
    rng = np.random.default_rng(1)

    def sample(n):
        log_e = rng.uniform(np.log(1e3), np.log(1e5), n)
        X = np.c_[log_e + rng.normal(0, 0.05, n), rng.normal(size=(n, 3))]
        return X, log_e

    train, val, test = sample(200), sample(100), sample(300)
    result = ref.regress_energy(*train, *val, *test, seed=0)
    other = ref.regress_energy(*train, *val, test[0], test[1] + 0.3, seed=0)
    for model in ("linear", "boosted"):
        assert result[model]["params"] == other[model]["params"]
        assert 0 < result[model]["test"]["incident_energy/resolution"] < 0.2
    assert result["linear"]["test"]["incident_energy/resolution"] == pytest.approx(0.05, rel=0.3)
    assert result["linear"]["params"]["penalty"] in ref.ALPHA_GRID
    assert result["best"]["model"] == "linear"  # linear truth: the linear model validates better


def test_pid_classifier_beats_chance(pid_events):
    X = ref.shower_features(pid_events, "par04-scipb")
    y = np.array([int(e.y) for e in pid_events])
    train, val = ref.split_labels(y[:160], 100, 60, seed=0)
    assert np.all(np.bincount(y[train], minlength=3) >= 32)  # balanced
    assert not set(train) & set(val)
    result = ref.classify(X[train], y[train], X[val], y[val], X[160:], y[160:], seed=0, models=("logistic",))
    assert result["logistic"]["test"]["accuracy"] > 0.6  # chance: 1/3
    assert result["logistic"]["test"]["n_test"] == 80


def test_segmentation_reference_runs_and_beats_chance(lartpc_events, monkeypatch):
    monkeypatch.setattr(ref, "SEGMENT_ITERATIONS", (20, 40))  # shorter tree paths: seconds, not tens
    points = ref.PointSet(lartpc_events)
    assert points.X.shape == (sum(e.num_nodes for e in lartpc_events), len(ref.POINT_FEATURE_NAMES))
    result = ref.segment(points.subset(range(8)), points.subset(range(8, 11)), lartpc_events[11:], seed=0,
                         max_train_points=8000)
    best = result["best"]
    assert best["n_train_points"] <= 8000 and best["n_train_events"] == 8 and best["test"]["n_test"] == 5
    assert best["params"]["class_weight_power"] in {p for p, _ in ref.SEGMENT_GRID}
    assert best["test"]["accuracy"] > 0.6 and best["test"]["mean_f1"] > 0.3
    present = np.unique(torch.cat([e.semantic for e in lartpc_events[11:]]).numpy())
    names = ("shower", "track", "michel", "delta", "low_energy")
    assert {k for k in best["test"] if k.startswith("f1/")} == {f"f1/{names[c]}" for c in present}


def test_balanced_cap_keeps_rare_classes():
    labels = np.r_[np.zeros(1000), np.ones(1000), 2 * np.ones(30)].astype(int)
    keep = ref._balanced_cap(labels, 300, np.random.default_rng(0))
    assert np.bincount(labels[keep]).tolist() == [135, 135, 30]
    assert len(np.unique(keep)) == 300


def test_metrics_mirror_matches_pcfm_task_metrics():
    try:
        from pcfm.finetuning import task_metrics
    except ImportError as error:
        pytest.skip(f"pcfm.tasks does not import now ({error})")
    rng = np.random.default_rng(0)
    truth = rng.integers(-1, 5, 500)
    truth[truth == 2] = 3  # a class absent from the truth
    prediction = rng.integers(0, 5, 500)
    assert ref._task_metrics_mirror("segmentation", prediction, truth) == pytest.approx(
        task_metrics("segmentation", prediction, truth), nan_ok=True)


def test_simulated_events_are_those_of_the_transfer_benchmark():
    try:
        from pcfm.engine.data import simulate_pretraining_events
    except ImportError as error:
        pytest.skip(f"pcfm.engine does not import now ({error})")
    mine = ref.simulate_events("pid", 6, seed=3)
    theirs = simulate_pretraining_events("par04-scipb", 6, particles=("electron", "photon", "pion"),
                                         energy_range=(1e3, 1e5), seed=3)
    for a, b in zip(mine, [theirs[i] for i in range(6)]):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.energy, b.energy) and int(a.y) == int(b.y)
    mine = ref.simulate_events("segmentation", 2, seed=3)
    theirs = simulate_pretraining_events("lartpc-768", 2, seed=3)
    for a, b in zip(mine, [theirs[i] for i in range(2)]):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.semantic, b.semantic)


def test_pcfm_core_does_not_import_sklearn():
    import subprocess

    code = ("import sys, pcfm, pcfm.data, pcfm.sim, pcfm.geometry, pcfm.evaluation; "
            "assert 'sklearn' not in sys.modules, 'pcfm imports sklearn'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)
    statement = re.compile(r"^\s*(import|from)\s+sklearn\b", re.MULTILINE)
    for path in (PROJECT_ROOT / "pcfm").rglob("*.py"):
        assert not statement.search(path.read_text()), f"{path} imports sklearn"


# ----------------------------------------------------------------------------- data and command line


@pytest.mark.skipif(not (GEANT4 / ref.GAMMA_PI0_FILES[0]).exists(),
                    reason=f"the Geant4 gamma / pi0 showers are not in {GEANT4} (shared/data is absent)")
def test_gamma_pi0_geant4_reference():
    events, labels = ref.read_gamma_pi0(GEANT4)
    assert len(events) == 1000 and np.bincount(labels).tolist() == [500, 500]
    rng = np.random.default_rng(0)
    picks = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), 150, replace=False) for c in (0, 1)]))
    X = ref.shower_features([events[i] for i in picks], "calochallenge-ds2")
    y = labels[picks]
    order = rng.permutation(len(y))
    train, val, test = order[:100], order[100:150], order[150:]
    result = ref.classify(X[train], y[train], X[val], y[val], X[test], y[test], seed=0, models=("logistic",))
    assert result["logistic"]["test"]["accuracy"] > 0.85  # 0.97 with 100 labels in the full benchmark


def test_command_line_writes_a_table_and_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "references_pid.json"
    argv = ["--task", "pid", "--n-labels", "30", "--n-val", "30", "--n-test", "60", "--seeds", "0", "1",
            "--models", "logistic", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/references.py"] + argv)
    rows = ref.main(argv)
    printed = capsys.readouterr().out
    assert "command: python benchmarks/references.py --task pid" in printed and "machine:" in printed
    assert "| logistic | 30 | 2 |" in printed
    written = json.loads(out.read_text())
    assert written["command"].startswith("python benchmarks/references.py")
    assert {(r["model"], r["seed"]) for r in written["results"]} == {(m, s) for m in ("logistic", "best") for s in (0, 1)}
    assert all(0 <= r["metrics"]["accuracy"] <= 1 and r["metrics"]["n_test"] == 60 for r in rows)
