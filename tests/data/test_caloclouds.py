"""CaloClouds point-cloud showers: the real ILD Geant4 sample, units, options and bad input."""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcfm.data.caloclouds import CaloCloudsDataset, read_caloclouds
from pcfm.errors import DataError

from tests.conftest import SHARED_DATA  # noqa: E402  ../shared/data beside the project root
REAL_FILE = SHARED_DATA / "caloclouds3_mini_sample.hdf5"


@pytest.fixture
def real_file() -> Path:
    if not REAL_FILE.exists():
        pytest.skip(f"real-data fixture not found at {REAL_FILE} (shared/data is absent)")
    return REAL_FILE


def write_file(path: Path, events: np.ndarray, energy: np.ndarray, **extra) -> Path:
    with h5py.File(path, "w") as f:
        f["events"] = np.asarray(events, dtype=np.float32)
        f["energy"] = np.asarray(energy, dtype=np.float32)
        for key, value in extra.items():
            f[key] = value
    return path


def padded_showers(rng, counts=(5, 3, 7), width=10) -> np.ndarray:
    """Showers with ``counts`` real points scattered among zero rows (padding first and between)."""
    events = np.zeros((len(counts), width, 4), dtype=np.float32)
    for i, n in enumerate(counts):
        rows = np.sort(rng.choice(width, size=n, replace=False))
        events[i, rows, :3] = rng.normal(size=(n, 3))
        events[i, rows, 3] = rng.uniform(0.001, 0.01, size=n)
    return events


# --- the real file -------------------------------------------------------------------------------

def test_real_ild_photon_showers(real_file):
    showers = read_caloclouds(real_file)
    assert [s.n_points for s in showers] == [163, 236]
    assert [round(s.incident_energy / 1000, 1) for s in showers] == [15.6, 41.9]  # MeV -> GeV
    for shower in showers:
        x, y, z, energy = shower.points.T
        assert np.all(energy > 0)
        layer = np.floor(y)
        assert layer.min() >= 0 and layer.max() <= 29  # y: depth in layer units, floor = layer index
        assert np.all(np.abs(x) < 500) and np.all(np.abs(z) < 500)  # mm, a shower's lateral extent
        np.testing.assert_allclose(np.linalg.norm(shower.direction), 1.0, atol=1e-6)
    # Visible energy (sampling calorimeter, Si readout) in MeV: the file's GeV times 1000.
    with h5py.File(real_file, "r") as f:
        raw = f["events"][:]
    for shower, rows in zip(showers, raw):
        np.testing.assert_allclose(shower.points[:, 3].sum(), rows[:, 3].sum() * 1000, rtol=1e-5)
        np.testing.assert_array_equal(shower.points[:, :3], rows[rows[:, 3] > 0, :3])
    np.testing.assert_allclose([s.points[:, 3].sum() for s in showers], [47.29, 97.76], atol=0.01)


def test_dataset_matches_reader_on_real_file(real_file):
    showers = read_caloclouds(real_file)
    dataset = CaloCloudsDataset(real_file)
    assert len(dataset) == 2 and not dataset._handles[0].is_open
    np.testing.assert_array_equal(dataset.event_sizes(), [163, 236])
    for got, want in zip(dataset, showers):
        np.testing.assert_array_equal(got.points, want.points)
        np.testing.assert_array_equal(got.direction, want.direction)
        assert got.incident_energy == want.incident_energy
    assert dataset[1].meta == {"path": str(real_file), "event": 1}
    assert len(CaloCloudsDataset(real_file, min_points=200)) == 1


def test_units_and_layer_pitch_options(real_file):
    gev = read_caloclouds(real_file)
    raw = read_caloclouds(real_file, energy_unit="MeV")  # the file is in GeV: values kept as stored
    deep = read_caloclouds(real_file, layer_pitch_mm=5.25)
    for g, r, d in zip(gev, raw, deep):
        np.testing.assert_allclose(r.points[:, 3] * 1000, g.points[:, 3], rtol=1e-6)
        np.testing.assert_allclose(r.incident_energy * 1000, g.incident_energy, rtol=1e-6)
        np.testing.assert_allclose(d.points[:, 1], g.points[:, 1] * 5.25, rtol=1e-6)
        np.testing.assert_array_equal(d.points[:, [0, 2, 3]], g.points[:, [0, 2, 3]])
    with pytest.raises(ValueError, match="energy_unit must be one of"):
        read_caloclouds(real_file, energy_unit="keV")
    with pytest.raises(ValueError, match="layer_pitch_mm must be positive"):
        CaloCloudsDataset(real_file, layer_pitch_mm=0)


def test_truncated_copy_of_real_file(real_file, tmp_path):
    cut = tmp_path / "cut.hdf5"
    data = real_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for read in (read_caloclouds, CaloCloudsDataset):
        with pytest.raises(DataError, match=re.escape(f"{cut}: truncated HDF5 file")):
            read(cut)


# --- synthetic files -----------------------------------------------------------------------------

def test_padding_anywhere_is_dropped_and_order_kept(tmp_path):
    rng = np.random.default_rng(3)
    events = padded_showers(rng)
    path = write_file(tmp_path / "pad.h5", events, [10.0, 20.0, 30.0])  # (N,) energies accepted
    showers = read_caloclouds(path)
    for shower, rows in zip(showers, events):
        want = rows[rows[:, 3] > 0] * np.float32([1, 1, 1, 1000])
        np.testing.assert_allclose(shower.points, want, rtol=1e-6)
        assert shower.direction is None
    assert [s.incident_energy for s in showers] == [10000.0, 20000.0, 30000.0]


def test_direction_stored_as_rows(tmp_path):
    rng = np.random.default_rng(4)
    directions = rng.normal(size=(2, 3))
    path = write_file(tmp_path / "rows.h5", padded_showers(rng, (2, 2)), [[1.0], [2.0]], p_norm_local=directions)
    for shower, want in zip(CaloCloudsDataset(path), directions):
        np.testing.assert_array_equal(shower.direction, want)


def _bad_cases(rng):
    """(name, events, energy, expected problem of event 1)."""
    good = padded_showers(rng, (4, 4, 4))
    empty = good.copy()
    empty[1] = 0.0
    nan = good.copy()
    nan[1, -1, 3] = np.nan
    inf_pad = good.copy()
    inf_pad[1, 0, 0] = np.inf  # in a padding row: still refused
    negative = good.copy()
    negative[1, 0, 3] = -0.002
    return [
        ("empty", empty, [[5.0]] * 3, "event has no points: every row is zero padding"),
        ("nan", nan, [[5.0]] * 3, "non-finite value (NaN or inf) in 'events'"),
        ("inf_padding", inf_pad, [[5.0]] * 3, "non-finite value (NaN or inf) in 'events'"),
        ("negative", negative, [[5.0]] * 3, "1 points have negative energy (lowest -0.002)"),
        ("incident", good, [[5.0], [np.nan], [5.0]], "incident energy must be positive and finite, got nan"),
        ("incident_zero", good, [[5.0], [0.0], [5.0]], "incident energy must be positive and finite, got 0.0"),
    ]


def test_bad_showers_name_file_and_event(tmp_path):
    for name, events, energy, problem in _bad_cases(np.random.default_rng(5)):
        path = write_file(tmp_path / f"{name}.h5", events, energy)
        message = re.escape(f"{path}: event 1: {problem}")
        with pytest.raises(DataError, match=message):
            read_caloclouds(path)
        dataset = CaloCloudsDataset(path)
        assert dataset[0].n_points == 4
        with pytest.raises(DataError, match=message):
            dataset[1]
        lenient = CaloCloudsDataset(path, on_error="skip")
        np.testing.assert_array_equal(lenient[1].points, dataset[2].points)
        assert [str(e) for e in lenient.skipped] == [f"{path}: event 1: {problem}"]


def test_scan_drops_empty_showers(tmp_path):
    events = padded_showers(np.random.default_rng(6), (3, 1, 2, 4))
    events[[0, 2]] = 0.0
    path = write_file(tmp_path / "holes.h5", events, [[1.0]] * 4)
    dataset = CaloCloudsDataset(path)
    np.testing.assert_array_equal(dataset.event_sizes(), [0, 1, 0, 4])
    report = dataset.scan()
    assert (report.n_checked, report.n_skipped) == (4, 2)
    assert str(report).splitlines()[0] == "checked 4 events, skipped 2"
    assert len(dataset) == 2 and [e.n_points for e in dataset] == [1, 4]


def test_bad_layouts_name_the_file(tmp_path):
    rng = np.random.default_rng(8)
    three_columns = write_file(tmp_path / "xyz.h5", padded_showers(rng)[..., :3], [[1.0]] * 3)
    with pytest.raises(DataError, match=re.escape(f"{three_columns}: 'events' must have shape (N, points, 4)")):
        read_caloclouds(three_columns)
    short_energy = write_file(tmp_path / "short.h5", padded_showers(rng), [[1.0]] * 2)
    with pytest.raises(DataError, match=re.escape(f"{short_energy}: datasets disagree on the number of events")):
        CaloCloudsDataset(short_energy)
    with pytest.raises(DataError, match=re.escape(f"{short_energy}: 'energy' must have shape (3,) or (3, 1)")):
        read_caloclouds(short_energy)
    no_energy = tmp_path / "no_energy.h5"
    with h5py.File(no_energy, "w") as f:
        f["events"] = padded_showers(rng)
        f["incident"] = np.ones(3)
    message = re.escape(f"{no_energy}: missing dataset(s) 'energy'; keys found: 'events', 'incident'")
    for read in (read_caloclouds, CaloCloudsDataset):
        with pytest.raises(DataError, match=message):
            read(no_energy)
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"CaloClouds? no." * 50)
    with pytest.raises(DataError, match=re.escape(f"{garbage}: not an HDF5 file")):
        read_caloclouds(garbage)


def test_absurd_coordinates_and_energies_are_named_and_counted(tmp_path):
    """Finite values beyond any detector (1e30 mm, 1e30 GeV; 1e39 in a float64 file) are out of range."""
    rng = np.random.default_rng(9)
    base = padded_showers(rng, (3, 4, 2, 5))
    cases = []
    far = base.copy()
    row = int(np.flatnonzero(far[1, :, 3] > 0)[1])
    far[1, row, 2] = 1e30
    cases.append((far, np.float32, f"point {row} has z = 1e+30, out of range (|z| above 1e+05, 100 m)"))
    hot = base.copy()
    row = int(np.flatnonzero(hot[1, :, 3] > 0)[0])
    hot[1, row, 3] = 1e30
    cases.append((hot, np.float32, f"point {row} has energy 1e+33 MeV, out of range (above 1e+07 MeV, 10 TeV)"))
    overflow = base.astype(np.float64)
    row = int(np.flatnonzero(overflow[1, :, 3] > 0)[0])
    overflow[1, row, 0] = 1e39  # finite in the file, inf in float32: not "NaN or inf"
    cases.append((overflow, np.float64, f"point {row} has x = 1e+39, out of range"))
    for k, (events, dtype, problem) in enumerate(cases):
        path = tmp_path / f"absurd{k}.h5"
        with h5py.File(path, "w") as f:
            f["events"] = events.astype(dtype)
            f["energy"] = np.ones(4, dtype)
        message = re.escape(f"{path}: event 1: {problem}")
        with pytest.raises(DataError, match=message):
            read_caloclouds(path)
        with pytest.raises(DataError, match=message):
            CaloCloudsDataset(path)[1]
        lenient = CaloCloudsDataset(path, on_error="skip")
        assert lenient[1].n_points == 2 and len(lenient.skipped) == 1  # the next shower stands in
        report = CaloCloudsDataset(path).scan()
        assert (report.n_checked, report.n_skipped) == (4, 1) and re.match(message, str(report.problems[0]))
    incident = write_file(tmp_path / "incident.h5", base, [[1.0], [1e30], [1.0], [1.0]])
    with pytest.raises(DataError, match=re.escape(f"{incident}: event 1: incident energy 1e+33 MeV is out of range")):
        read_caloclouds(incident)
