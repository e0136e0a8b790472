"""CaloChallenge files: exact round trips, voxel order, geometry inference, every bad input,
atomic writes and lazy reading."""
import os
import pickle
import re

import h5py
import numpy as np
import pytest

from pcfm import geometry as geometries
from pcfm.data.calochallenge import (CaloChallengeFile, SkippedEventsWarning, read_calochallenge,
                                     write_calochallenge)
from pcfm.data.events import CaloShowers
from pcfm.data.pointcloud import shower_to_data
from pcfm.errors import DataError

DS2 = "calochallenge-ds2"


def make_showers(geometry=DS2, n=6, seed=0, extras=False) -> CaloShowers:
    """Random sparse float32 showers with no empty event."""
    rng = np.random.default_rng(seed)
    n_cells = geometry_cells(geometry)
    cells = (rng.random((n, n_cells)) < 0.2) * rng.exponential(2.0, (n, n_cells))
    cells[:, 0] += 0.5
    incident = rng.uniform(1e3, 1e6, n)
    angles = dict(theta=rng.uniform(0, np.pi, n), phi=rng.uniform(-np.pi, np.pi, n),
                  particle=rng.choice([11, 22, 211], n)) if extras else {}
    return CaloShowers(incident.astype(np.float32), cells.astype(np.float32), geometry, **angles)


def geometry_cells(name) -> int:
    return geometries.get(name).n_cells


def write_raw(path, showers, incident, **extra):
    """A file in the official layout written with plain h5py (no pcfm validation)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=showers, compression="gzip")
        f.create_dataset("incident_energies", data=incident, compression="gzip")
        for key, value in extra.items():
            f.create_dataset(key, data=value)


# --- round trips and layout ----------------------------------------------------------------------
def test_write_read_round_trip_is_exact_float32_with_extras(tmp_path):
    path = tmp_path / "ds2.h5"
    showers = make_showers(extras=True)
    write_calochallenge(path, showers)
    back = read_calochallenge(path)
    assert back.showers.dtype == np.float32 and back.incident_energies.dtype == np.float32
    np.testing.assert_array_equal(back.showers, showers.showers)
    np.testing.assert_array_equal(back.incident_energies, showers.incident_energies)
    np.testing.assert_array_equal(back.theta, showers.theta.astype(np.float32))
    np.testing.assert_array_equal(back.phi, showers.phi.astype(np.float32))
    np.testing.assert_array_equal(back.particle, showers.particle)
    assert back.geometry == DS2


def test_written_file_has_the_official_layout(tmp_path):
    path = tmp_path / "ds2.h5"
    write_calochallenge(path, make_showers(n=5))
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"incident_energies", "showers"}
        assert f["incident_energies"].shape == (5, 1) and f["showers"].shape == (5, 6480)
        assert f["showers"].dtype == np.float32 and f["incident_energies"].dtype == np.float64
        assert f["showers"].compression == "gzip"
        assert f.attrs["geometry"] == DS2
    back = read_calochallenge(path)
    assert back.theta is None and back.phi is None and back.particle is None


def test_written_file_passes_the_official_evaluations_checks(tmp_path):
    """What the official CaloChallenge 2022 evaluation (code/evaluate.py, check_file and its
    classifier's input) expects of a ds2 file: as many incident energies as showers, 6480 voxels
    per shower, float64 incident energies of shape (N, 1); the values survive exactly."""
    path = tmp_path / "ds2.h5"
    showers = make_showers(n=7)
    write_calochallenge(path, showers)
    with h5py.File(path, "r") as f:
        energies, cells = f["incident_energies"][:], f["showers"][:]
    assert energies.shape == (7, 1) and cells.shape == (7, 6480) and energies.dtype == np.float64
    assert np.issubdtype(cells.dtype, np.floating)
    np.testing.assert_array_equal(energies[:, 0].astype(np.float32), showers.incident_energies)
    assert read_calochallenge(path).incident_energies.dtype == np.float32  # pcfm reads both widths


def test_reads_official_files_with_float64_and_flat_incident_energies(tmp_path):
    path = tmp_path / "official.h5"
    showers = make_showers(n=4)
    write_raw(path, showers.showers.astype(np.float64), showers.incident_energies.astype(np.float64))
    back = read_calochallenge(path)
    np.testing.assert_array_equal(back.showers, showers.showers)
    assert back.geometry == DS2


def test_voxel_order_is_layer_alpha_radial_with_radial_fastest(tmp_path):
    cells = np.zeros((1, 45, 16, 9), dtype=np.float32)
    cells[0, 3, 5, 2] = 42.0
    path = tmp_path / "one.h5"
    write_calochallenge(path, CaloShowers([1000.0], cells.reshape(1, -1), DS2))
    back = read_calochallenge(path)
    assert np.flatnonzero(back.showers[0]).tolist() == [3 * 144 + 5 * 9 + 2]  # 479
    data = shower_to_data(back, 0)
    assert data.cell.tolist() == [479]
    x, y, z = data.pos[0].double().tolist()
    assert 3 * 3.4 <= z < 4 * 3.4
    assert 9.3 <= np.hypot(x, y) < 13.95
    alpha = np.arctan2(y, x)
    assert -np.pi + 5 * 2 * np.pi / 16 <= alpha < -np.pi + 6 * 2 * np.pi / 16
    assert data.energy.tolist() == [42.0]


@pytest.mark.parametrize("name", ["calochallenge-ds1-photons", "calochallenge-ds1-pions", DS2, "calochallenge-ds3"])
def test_geometry_is_inferred_from_the_voxel_count(tmp_path, name):
    path = tmp_path / "raw.h5"
    showers = make_showers(name, n=2)
    write_raw(path, showers.showers, showers.incident_energies.reshape(-1, 1))
    assert read_calochallenge(path).geometry == name


def test_6480_voxels_default_to_ds2_unless_the_file_or_caller_names_scipb(tmp_path):
    showers = make_showers(n=2)
    raw = tmp_path / "raw.h5"
    write_raw(raw, showers.showers, showers.incident_energies.reshape(-1, 1))
    assert read_calochallenge(raw).geometry == DS2
    assert read_calochallenge(raw, "par04-scipb").geometry == "par04-scipb"
    named = tmp_path / "scipb.h5"
    write_calochallenge(named, showers, "par04-scipb")
    assert read_calochallenge(named).geometry == "par04-scipb"


def test_start_stop_and_small_blocks_give_the_same_events(tmp_path):
    path = tmp_path / "ds2.h5"
    showers = make_showers(n=10, extras=True)
    write_calochallenge(path, showers, chunk_events=3)
    part = read_calochallenge(path, start=2, stop=7, block_events=2)
    np.testing.assert_array_equal(part.showers, showers.showers[2:7])
    np.testing.assert_array_equal(part.particle, showers.particle[2:7])
    np.testing.assert_array_equal(read_calochallenge(path, start=-3).incident_energies, showers.incident_energies[-3:])


# --- bad input -----------------------------------------------------------------------------------
def test_missing_keys_are_named_with_the_keys_found(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=np.ones((2, 6480), np.float32))
        f.create_dataset("energy", data=np.ones((2, 1), np.float32))
    with pytest.raises(DataError) as err:
        read_calochallenge(path)
    message = str(err.value)
    assert str(path) in message and "'incident_energies'" in message and "'energy'" in message


def test_wrong_voxel_count_names_geometry_and_counts(tmp_path):
    path = tmp_path / "ds1.h5"
    showers = make_showers("calochallenge-ds1-photons", n=2)
    write_raw(path, showers.showers, showers.incident_energies.reshape(-1, 1))
    with pytest.raises(DataError, match="368 voxels per event but geometry 'calochallenge-ds2' has 6480 cells") as err:
        read_calochallenge(path, DS2)
    assert str(path) in str(err.value)
    unknown = tmp_path / "unknown.h5"
    write_raw(unknown, np.ones((2, 100), np.float32), np.ones((2, 1), np.float32))
    with pytest.raises(DataError, match="no preset geometry has 100 voxels"):
        read_calochallenge(unknown)


def test_mismatched_event_counts(tmp_path):
    path = tmp_path / "bad.h5"
    write_raw(path, np.ones((3, 6480), np.float32), np.ones((2, 1), np.float32))
    with pytest.raises(DataError, match="'incident_energies' holds 2 events but 'showers' holds 3") as err:
        read_calochallenge(path)
    assert str(path) in str(err.value)


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(DataError, match="not an HDF5 file") as err:
        read_calochallenge(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("event, damage, problem", [
    (4, lambda s, e: s.__setitem__((4, 10), np.nan), "non-finite cell energy"),
    (4, lambda s, e: s.__setitem__((4, 10), np.inf), "non-finite cell energy"),
    (5, lambda s, e: s.__setitem__((5, 77), -0.25), "negative cell energy -0.25 MeV in cell 77"),
    (6, lambda s, e: e.__setitem__(6, 0.0), "incident energy must be positive and finite, got 0 MeV"),
    (6, lambda s, e: e.__setitem__(6, -5.0), "incident energy must be positive and finite, got -5 MeV"),
    (7, lambda s, e: s.__setitem__(7, 0.0), "empty shower: all 6480 cells are zero"),
])
def test_bad_events_are_named_by_file_and_index(tmp_path, event, damage, problem):
    showers = make_showers(n=9)
    cells, incident = showers.showers.copy(), showers.incident_energies.copy()
    damage(cells, incident)
    path = tmp_path / "bad.h5"
    write_raw(path, cells, incident.reshape(-1, 1))
    with pytest.raises(DataError) as err:
        read_calochallenge(path, block_events=3)  # the bad event is not in the first block
    assert str(err.value).startswith(f"{path}: event {event}: {problem}")
    assert err.value.event == event

    with pytest.warns(SkippedEventsWarning, match="skipped 1 bad event") as record:
        kept = read_calochallenge(path, on_error="skip", block_events=3)
    assert [e.event for e in record[0].message.errors] == [event]
    keep = np.arange(9) != event
    np.testing.assert_array_equal(kept.showers, cells[keep])
    np.testing.assert_array_equal(kept.incident_energies, incident[keep])

    with pytest.raises(DataError, match=f"event {event}: "):  # the writer validates too
        write_calochallenge(tmp_path / "out.h5", CaloShowers(incident, cells, DS2))


def test_skip_mode_reports_every_bad_event_and_keeps_extras_aligned(tmp_path):
    showers = make_showers(n=8, extras=True)
    cells = showers.showers.copy()
    cells[[1, 6]] = 0.0
    path = tmp_path / "bad.h5"
    write_raw(path, cells, showers.incident_energies.reshape(-1, 1), particle=showers.particle,
              theta=showers.theta, phi=showers.phi)
    with pytest.warns(SkippedEventsWarning) as record:
        kept = read_calochallenge(path, on_error="skip")
    assert [e.event for e in record[0].message.errors] == [1, 6]
    np.testing.assert_array_equal(kept.particle, showers.particle[[0, 2, 3, 4, 5, 7]])


# --- atomic writes -------------------------------------------------------------------------------
def test_failed_write_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "out.h5"
    bad = make_showers(n=3)
    bad.showers[2, 5] = np.nan
    with pytest.raises(DataError, match=f"{path}: event 2: non-finite"):
        write_calochallenge(path, bad)
    assert os.listdir(tmp_path) == []

    write_calochallenge(path, make_showers(n=3, seed=1))
    before = path.read_bytes()
    with pytest.raises(ValueError):  # fails inside the HDF5 writing, after the temporary file exists
        write_calochallenge(path, make_showers(n=3, seed=2), compression="no-such-filter")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.h5"]


# --- lazy access ---------------------------------------------------------------------------------
def test_lazy_file_reads_single_events_and_slices(tmp_path):
    path = tmp_path / "ds2.h5"
    showers = make_showers(n=10, extras=True)
    write_calochallenge(path, showers, chunk_events=4)
    lazy = CaloChallengeFile(path)
    assert len(lazy) == 10 and lazy.geometry.name == DS2 and lazy.n_voxels == 6480
    np.testing.assert_array_equal(lazy[3].showers, showers.showers[3:4])
    np.testing.assert_array_equal(lazy[-1].particle, showers.particle[-1:])
    np.testing.assert_array_equal(lazy[2:6].showers, showers.showers[2:6])
    blocks = list(lazy.iter_blocks(4))
    assert [len(b) for b in blocks] == [4, 4, 2]
    expected = np.count_nonzero(showers.showers >= geometries.get(DS2).readout_threshold_mev, axis=1)
    np.testing.assert_array_equal(lazy.count_cells(geometries.get(DS2).readout_threshold_mev, 3), expected)
    with pytest.raises(IndexError):
        lazy[10]
    clone = pickle.loads(pickle.dumps(lazy))  # what a spawned DataLoader worker receives
    np.testing.assert_array_equal(clone[7].showers, showers.showers[7:8])


def test_lazy_file_validates_the_events_it_reads(tmp_path):
    showers = make_showers(n=5)
    cells = showers.showers.copy()
    cells[3, 0] = -1.0
    path = tmp_path / "bad.h5"
    write_raw(path, cells, showers.incident_energies.reshape(-1, 1))
    lazy = CaloChallengeFile(path)  # opening does not read events
    np.testing.assert_array_equal(lazy[2].showers, cells[2:3])
    with pytest.raises(DataError, match=f"{path}: event 3: negative cell energy"):
        lazy[1:5]


def test_bad_optional_datasets_are_named(tmp_path):
    showers = make_showers(n=4, extras=True)
    theta = showers.theta.copy()
    theta[2] = np.nan
    path = tmp_path / "theta.h5"
    write_raw(path, showers.showers, showers.incident_energies.reshape(-1, 1), theta=theta)
    with pytest.raises(DataError, match=f"{path}: event 2: non-finite theta nan"):
        read_calochallenge(path)
    particle = np.array([11.0, 22.0, 211.0, 22.5])
    path = tmp_path / "particle.h5"
    write_raw(path, showers.showers, showers.incident_energies.reshape(-1, 1), particle=particle)
    with pytest.raises(DataError, match=f"{path}: event 3: particle code 22.5 is not an integer PDG code"):
        read_calochallenge(path)
    path = tmp_path / "shape.h5"
    write_raw(path, showers.showers, showers.incident_energies.reshape(-1, 1), phi=np.zeros(3))
    with pytest.raises(DataError, match="optional dataset 'phi' must have shape \\(4,\\) or \\(4, 1\\)"):
        read_calochallenge(path)


# --- values that are finite but absurd -------------------------------------------------------------
@pytest.mark.parametrize("dtype, event, damage, problem", [
    (np.float32, 2, lambda s, e: s.__setitem__((2, 40), 1e30),
     "cell energy 1e+30 MeV in cell 40 is out of range (above 1e+07 MeV, 10 TeV)"),
    # finite in a float64 file, inf once cast to float32: out of range, not "NaN or inf"
    (np.float64, 3, lambda s, e: s.__setitem__((3, 41), 1e39),
     "cell energy 1e+39 MeV in cell 41 is out of range"),
    (np.float32, 4, lambda s, e: e.__setitem__(4, 1e30), "incident energy 1e+30 MeV is out of range"),
    (np.float64, 4, lambda s, e: e.__setitem__(4, 1e39), "incident energy 1e+39 MeV is out of range"),
])
def test_out_of_range_energies_are_named_and_skipped(tmp_path, dtype, event, damage, problem):
    from pcfm.data import open_dataset

    showers = make_showers(n=6)
    cells, incident = showers.showers.astype(dtype), showers.incident_energies.astype(dtype)
    damage(cells, incident)
    path = tmp_path / "absurd.h5"
    write_raw(path, cells, incident.reshape(-1, 1))
    with pytest.raises(DataError) as err:
        read_calochallenge(path)
    assert str(err.value).startswith(f"{path}: event {event}: {problem}")
    with pytest.warns(SkippedEventsWarning, match="skipped 1 bad event"):
        assert len(read_calochallenge(path, on_error="skip")) == 5
    with pytest.raises(DataError, match=re.escape(f"event {event}: {problem}")):
        CaloChallengeFile(path)[event]
    dataset = open_dataset(path, on_error="skip")
    report = dataset.scan()
    assert report.n_skipped == 1 and report.problems[0].event == event and "out of range" in str(report.problems[0])
    assert len(dataset) == 5
    with pytest.raises(DataError, match=f"event {event}: .*out of range"):  # the writer checks the values given
        write_calochallenge(tmp_path / "out.h5", CaloShowers(incident, cells, DS2))


def test_a_file_without_events_is_refused_by_the_datasets(tmp_path):
    from pcfm.data import open_dataset

    path = tmp_path / "none.h5"
    write_raw(path, np.zeros((0, geometry_cells(DS2)), np.float32), np.zeros((0, 1), np.float32))
    with pytest.raises(DataError, match=f"^{path}: holds no events"):
        open_dataset(path)
