"""PILArNet-M reader, writer and lazy dataset: exact round trips, bad input, laziness, workers."""
from __future__ import annotations

import os
import pickle
import re

import h5py
import numpy as np
import pytest
import torch

from pcfm.data.events import LArEvent
from pcfm.data.pilarnet import PILArNetDataset, read_pilarnet_event, write_pilarnet
from pcfm.errors import DataError


def random_event(rng: np.random.Generator, version: int, n_clusters: int | None = None) -> LArEvent:
    """A consistent random event: clusters of 1..40 points, labels in range, positive energies."""
    m = int(rng.integers(2, 12)) if n_clusters is None else n_clusters
    sizes = rng.integers(1, 40, size=m)
    n = int(sizes.sum())
    points = rng.uniform(0, 768, size=(n, 8)).astype(np.float32)
    points[:, 3] = rng.exponential(1.0, size=n).astype(np.float32)
    columns = [sizes, rng.integers(0, 50, m), rng.integers(0, 20, m), rng.integers(0, 3, m), rng.integers(0, 5, m)]
    extra = None
    if version == 2:
        columns.append(rng.integers(-1, 5, m))
        extra = rng.normal(size=(m, 5)).astype(np.float32)
    return LArEvent(points, np.stack(columns, axis=1).astype(np.int64), extra)


def write_raw(path, points, clusters, extras=None, cluster_dtype=np.int64, point_dtype=np.float32):
    """Write flat per-event arrays as they are, bypassing every check (to build bad files)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("point", data=_objects(points, point_dtype), dtype=h5py.vlen_dtype(point_dtype))
        f.create_dataset("cluster", data=_objects(clusters, cluster_dtype), dtype=h5py.vlen_dtype(cluster_dtype))
        if extras is not None:
            f.create_dataset("cluster_extra", data=_objects(extras, np.float32), dtype=h5py.vlen_dtype(np.float32))


def _objects(arrays, dtype):
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a, dtype=dtype).reshape(-1)
    return out


def assert_same_event(got: LArEvent, want: LArEvent):
    assert got.version == want.version
    np.testing.assert_array_equal(got.points, want.points)
    np.testing.assert_array_equal(got.clusters, want.clusters)
    np.testing.assert_array_equal(got.semantic, np.repeat(want.clusters[:, 4], want.clusters[:, 0]))
    if want.version == 2:
        np.testing.assert_array_equal(got.particle_id, np.repeat(want.clusters[:, 5], want.clusters[:, 0]))
        np.testing.assert_array_equal(got.cluster_extra, want.cluster_extra)
    else:
        assert got.cluster_extra is None


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_is_exact(tmp_path, rng, version):
    events = [random_event(rng, version) for _ in range(7)]
    path = tmp_path / f"generic_v{version}.h5"
    assert write_pilarnet(path, events) == 7
    with h5py.File(path, "r") as f:
        assert h5py.check_vlen_dtype(f["point"].dtype) == np.float32
        assert h5py.check_vlen_dtype(f["cluster"].dtype) == np.int64
        assert ("cluster_extra" in f) == (version == 2)
        assert f["point"][3].size == events[3].points.size  # flat, as in PILArNet-M
    for i, want in enumerate(events):
        got = read_pilarnet_event(path, i)
        assert_same_event(got, want)
        assert got.meta == {"path": str(path), "event": i}
    dataset = PILArNetDataset(path)
    assert len(dataset) == 7 and dataset.versions == [version]
    for got, want in zip(dataset, events):
        assert_same_event(got, want)
    assert_same_event(read_pilarnet_event(path, -1), events[-1])


def test_writer_streams_a_generator_in_blocks(tmp_path, rng):
    events = [random_event(rng, 2) for _ in range(11)]
    path = tmp_path / "blocks.h5"
    assert write_pilarnet(path, (e for e in events), block=4) == 11
    for i in (0, 3, 4, 10):
        assert_same_event(read_pilarnet_event(path, i), events[i])


def test_empty_event_list_writes_an_empty_v1_file_that_the_dataset_refuses_by_name(tmp_path):
    path = tmp_path / "empty.h5"
    assert write_pilarnet(path, []) == 0
    with h5py.File(path) as f:
        assert f["point"].shape == (0,) and "cluster_extra" not in f
    # an empty data set would fail later, in training, naming no file
    with pytest.raises(DataError, match=re.escape(f"{path}: holds no events")):
        PILArNetDataset(path)
    other = tmp_path / "other.h5"
    assert write_pilarnet(other, []) == 0
    with pytest.raises(DataError, match=re.escape(f"{path}: holds no events, nor do the other 1 file(s) given")):
        PILArNetDataset([path, other])


def test_reader_accepts_float_and_int32_cluster_entries(tmp_path, rng):
    event = random_event(rng, 2)
    for dtype in (np.float32, np.int32):
        path = tmp_path / f"cluster_{np.dtype(dtype).name}.h5"
        write_raw(path, [event.points], [event.clusters], [event.cluster_extra], cluster_dtype=dtype)
        got = read_pilarnet_event(path, 0)
        assert got.clusters.dtype == np.int64
        assert_same_event(got, event)


def test_non_integer_cluster_values_are_refused(tmp_path, rng):
    event = random_event(rng, 1, n_clusters=2)
    clusters = event.clusters.astype(np.float32)
    clusters[1, 1] = 2.5
    path = tmp_path / "frac.h5"
    write_raw(path, [event.points], [clusters], cluster_dtype=np.float32)
    with pytest.raises(DataError, match=re.escape(f"{path}: event 0: 'cluster' holds non-integer values")):
        read_pilarnet_event(path, 0)


# --- writer refusals and atomicity ---------------------------------------------------------------

def test_writer_refuses_mixed_versions(tmp_path, rng):
    path = tmp_path / "mixed.h5"
    with pytest.raises(DataError, match=re.escape(f"{path}: event 1: event is PILArNet-M v2 but the file is v1")):
        write_pilarnet(path, [random_event(rng, 1), random_event(rng, 2)])
    with pytest.raises(DataError, match=re.escape(f"{path}: event 0: event is PILArNet-M v1 but the file is v2")):
        write_pilarnet(path, [random_event(rng, 1)], version=2)
    assert list(tmp_path.iterdir()) == []


def test_writer_failing_midway_leaves_nothing_and_keeps_old_file(tmp_path, rng):
    good = [random_event(rng, 2) for _ in range(3)]
    bad = random_event(rng, 2)
    bad.points[5, 3] = np.nan
    path = tmp_path / "out.h5"
    with pytest.raises(DataError, match=re.escape(f"{path}: event 4: non-finite value")):
        write_pilarnet(path, good + [good[0], bad] + good, block=2)  # two blocks written before the failure
    assert list(tmp_path.iterdir()) == []

    write_pilarnet(path, good)
    before = path.read_bytes()
    with pytest.raises(DataError, match=re.escape(f"{path}: event 1:")):
        write_pilarnet(path, [good[0], bad])
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    assert_same_event(read_pilarnet_event(path, 2), good[2])


# --- bad files -----------------------------------------------------------------------------------

def _bad_event_cases(rng):
    """(name, points, clusters, expected problem) for event 1 of a two-event file."""
    e = random_event(rng, 1, n_clusters=3)
    n = e.points.shape[0]
    nan = e.points.copy()
    nan[2, 3] = np.nan
    inf = e.points.copy()
    inf[0, 3] = np.inf
    negative = e.points.copy()
    negative[[1, 4], 3] = [-0.5, -2.0]
    short = e.clusters.copy()
    short[0, 0] -= 1
    bad_class = e.clusters.copy()
    bad_class[2, 4] = 7
    return [
        ("point_reshape", e.points.reshape(-1)[:-3], e.clusters, f"'point' holds {n * 8 - 3} values, not a multiple of 8"),
        ("cluster_reshape", e.points, e.clusters.reshape(-1)[:-1], "'cluster' holds 14 values, not a multiple of 5"),
        ("nan_energy", nan, e.clusters, "non-finite value (NaN or inf) in 'point'"),
        ("inf_energy", inf, e.clusters, "non-finite value (NaN or inf) in 'point'"),
        ("negative_energy", negative, e.clusters, "2 points have negative energy (lowest -2 MeV)"),
        ("empty", np.zeros((0, 8)), np.zeros((0, 5)), "event has no points"),
        ("sizes_sum", e.points, short, f"cluster sizes sum to {n - 1} but the event has {n} points"),
        ("semantic_range", e.points, bad_class, "semantic class 7 outside 0..4"),
    ]


def test_bad_events_name_file_event_and_problem(tmp_path, rng):
    good = random_event(rng, 1)
    for name, points, clusters, problem in _bad_event_cases(rng):
        path = tmp_path / f"{name}.h5"
        write_raw(path, [good.points, points], [good.clusters, clusters])
        message = re.escape(f"{path}: event 1: {problem}")
        with pytest.raises(DataError, match=message):
            read_pilarnet_event(path, 1)
        dataset = PILArNetDataset(path)
        assert_same_event(dataset[0], good)
        if name == "cluster_reshape":  # a malformed cluster table counts no points
            np.testing.assert_array_equal(dataset.event_sizes(), [good.points.shape[0], 0])
        with pytest.raises(DataError, match=message):
            dataset[1]


def test_bad_v2_cluster_extra_shape(tmp_path, rng):
    e = random_event(rng, 2, n_clusters=3)
    path = tmp_path / "extra.h5"
    write_raw(path, [e.points], [e.clusters], [e.cluster_extra[:2]])
    with pytest.raises(DataError, match=re.escape(f"{path}: event 0: 'cluster_extra' must reshape to (3, 5), got (2, 5)")):
        read_pilarnet_event(path, 0)


def test_missing_key_lists_the_keys_found(tmp_path, rng):
    path = tmp_path / "nocluster.h5"
    with h5py.File(path, "w") as f:
        f["point"] = np.zeros(3)
        f["energy"] = np.zeros(3)
    message = re.escape(f"{path}: missing dataset(s) 'cluster'; keys found: 'energy', 'point'")
    with pytest.raises(DataError, match=message):
        read_pilarnet_event(path, 0)
    with pytest.raises(DataError, match=message):
        PILArNetDataset(path)


def test_fixed_size_datasets_are_refused(tmp_path):
    path = tmp_path / "dense.h5"
    with h5py.File(path, "w") as f:
        f["point"] = np.zeros((2, 16), np.float32)
        f["cluster"] = np.zeros((2, 5), np.float32)
    with pytest.raises(DataError, match=re.escape(
            f"{path}: 'point' must be a 1-D dataset of variable-length arrays, found shape (2, 16), dtype float32")):
        PILArNetDataset(path)


def test_datasets_of_different_lengths_are_refused(tmp_path, rng):
    e = random_event(rng, 1)
    path = tmp_path / "lengths.h5"
    write_raw(path, [e.points, e.points], [e.clusters])
    with pytest.raises(DataError, match=re.escape(f"{path}: datasets disagree on the number of events")):
        PILArNetDataset(path)


def test_garbage_and_truncated_files(tmp_path, rng):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(DataError, match=re.escape(f"{garbage}: not an HDF5 file")):
        read_pilarnet_event(garbage, 0)
    with pytest.raises(DataError, match=re.escape(f"{garbage}: not an HDF5 file")):
        PILArNetDataset(tmp_path / "*.h5")

    whole = tmp_path / "whole.hdf5"
    write_pilarnet(whole, [random_event(rng, 2) for _ in range(20)])
    cut = tmp_path / "cut.hdf5"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"{cut}: truncated HDF5 file")):
        read_pilarnet_event(cut, 0)
    with pytest.raises(DataError, match=re.escape(f"{cut}: truncated HDF5 file")):
        PILArNetDataset([whole, cut])


# --- the lazy dataset ----------------------------------------------------------------------------

@pytest.fixture
def two_files(tmp_path, rng):
    """Events of two files (v1 with 5, v2 with 4 events), named so that the glob sorts a, b."""
    first = [random_event(rng, 1) for _ in range(5)]
    second = [random_event(rng, 2) for _ in range(4)]
    write_pilarnet(tmp_path / "a_v1.h5", first)
    write_pilarnet(tmp_path / "b_v2.h5", second)
    return tmp_path, first + second


def test_global_index_over_files_and_laziness(two_files):
    folder, events = two_files
    dataset = PILArNetDataset(str(folder / "*_v?.h5"))
    assert len(dataset) == 9 and dataset.versions == [1, 2]
    assert not any(h.is_open for h in dataset._handles)  # construction read shapes only
    assert dataset.locate(6) == (folder / "b_v2.h5", 1)
    assert_same_event(dataset[6], events[6])
    assert [h.is_open for h in dataset._handles] == [False, True]  # only the file needed
    assert_same_event(dataset[-9], events[0])
    with pytest.raises(IndexError, match="index 9 out of range for a dataset of 9 events"):
        dataset[9]
    assert len(PILArNetDataset([folder / "b_v2.h5", folder / "a_v1.h5", folder / "a_v1.h5"])) == 9


def test_event_sizes_min_points_and_transform(two_files):
    folder, events = two_files
    sizes = np.array([e.points.shape[0] for e in events])
    dataset = PILArNetDataset(folder, size_chunk=2, transform=lambda e: e.points.shape[0])
    calls = []
    count_points = dataset._count_points
    dataset._count_points = lambda *args: calls.append(args[1:3]) or count_points(*args)
    np.testing.assert_array_equal(dataset.event_sizes(), sizes)
    np.testing.assert_array_equal(dataset.event_sizes(), sizes)
    assert calls == [(0, 2), (2, 4), (4, 5), (0, 2), (2, 4)]  # chunks of 2 per file, read once
    cut = int(np.median(sizes))
    big = PILArNetDataset(folder, min_points=cut, transform=lambda e: e.points.shape[0])
    np.testing.assert_array_equal(big.event_sizes(), sizes[sizes >= cut])
    assert [big[i] for i in range(len(big))] == sizes[sizes >= cut].tolist()


def test_skip_mode_and_scan(tmp_path, rng):
    events = [random_event(rng, 1) for _ in range(6)]
    points = [e.points for e in events]
    points[2] = points[2].copy()
    points[2][0, 3] = -1.0
    points[5] = np.zeros((0, 8))
    clusters = [e.clusters for e in events]
    clusters[5] = np.zeros((0, 5))
    path = tmp_path / "some_bad.h5"
    write_raw(path, points, clusters)

    with pytest.raises(DataError, match=re.escape(f"{path}: event 2: 1 points have negative energy")):
        PILArNetDataset(path)[2]

    lenient = PILArNetDataset(path, on_error="skip")
    assert len(lenient) == 6
    sizes = [e.points.shape[0] for e in events]
    np.testing.assert_array_equal(lenient.event_sizes(), sizes[:5] + [0])
    assert_same_event(lenient[2], events[3])  # the next good event stands in
    assert_same_event(lenient[5], events[0])  # wrapping round
    assert [str(e) for e in lenient.skipped] == [
        f"{path}: event 2: 1 points have negative energy (lowest -1 MeV)",
        f"{path}: event 5: event has no points",
    ]

    report = PILArNetDataset(path, on_error="skip").scan()
    assert report.n_checked == 6 and report.n_skipped == 2
    assert [(e.path, e.event) for e in report.problems] == [(str(path), 2), (str(path), 5)]
    scanned = PILArNetDataset(path)
    scanned.scan()
    assert len(scanned) == 4
    np.testing.assert_array_equal(scanned.event_sizes(), [events[i].points.shape[0] for i in (0, 1, 3, 4)])
    assert_same_event(scanned[2], events[3])


def test_every_event_bad_in_skip_mode(tmp_path, rng):
    e = random_event(rng, 1)
    path = tmp_path / "all_bad.h5"
    write_raw(path, [e.points[:-1]] * 2, [e.clusters] * 2)
    with pytest.raises(DataError, match="every one of the 2 events is bad"):
        PILArNetDataset(path, on_error="skip")[0]


def test_dataloader_workers_after_parent_opened_the_files(two_files):
    folder, events = two_files
    dataset = PILArNetDataset(folder)
    assert_same_event(dataset[0], events[0])  # the parent now holds open handles
    parent_handle = dataset._handles[0]._file
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=list)
    got = [event for batch in loader for event in batch]
    assert len(got) == 9
    for g, w in zip(got, events):
        assert_same_event(g, w)
    assert dataset._handles[0]._file is parent_handle and parent_handle.id.valid  # parent untouched
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    assert not clone._handles[0].is_open
    assert_same_event(clone[8], events[8])



@pytest.mark.parametrize("version", [1, 2])
def test_events_of_equal_size_round_trip(tmp_path, version):
    """Equal-length entries must not be written as a 2-D block (an h5py broadcasting trap)."""
    rng = np.random.default_rng(3)
    events = [random_event(rng, version, n_clusters=4) for _ in range(3)]
    for event in events:  # same number of points and clusters in every event
        event.clusters[:, 0] = 6
        event.points = event.points[:24]
    path = tmp_path / "equal.h5"
    write_pilarnet(path, events)
    for i, event in enumerate(events):
        assert_same_event(read_pilarnet_event(path, i), event)


# --- values that are finite but absurd, and what the messages say -------------------------------

def _absurd_cases(rng):
    """(name, points, clusters, point dtype, expected problem) for event 1 of a two-event file."""
    e = random_event(rng, 1, n_clusters=3)
    outside = e.points.copy()
    outside[[2, 5], 0] = [800.0, 900.0]
    huge = e.points.copy()
    huge[1, 2] = 2e38  # a float32, but inf once converted to mm (was caught only as a diverged loss)
    below = e.points.copy()
    below[0, 1] = -1.0
    energy = e.points.copy()
    energy[3, 3] = 1e30
    overflow = e.points.astype(np.float64)
    overflow[4, 5] = 1e39  # finite in the file, inf in float32
    big_coordinate = e.points.astype(np.float64)
    big_coordinate[0, 0] = 1e39
    negative = e.clusters.copy()  # sizes still sum to the number of points
    negative[:2, 0] = [negative[0, 0] + negative[1, 0] + 3, -3]
    return [
        ("outside", outside, e.clusters, np.float32,
         f"2 points lie outside the 768x768x768 voxel box (first: point 2 at voxel (800, {outside[2, 1]:.6g}, "
         f"{outside[2, 2]:.6g}))"),
        ("huge", huge, e.clusters, np.float32, "1 points lie outside the 768x768x768 voxel box (first: point 1 at"),
        ("below", below, e.clusters, np.float32, "1 points lie outside the 768x768x768 voxel box (first: point 0 at"),
        ("energy", energy, e.clusters, np.float32,
         "point 3 has energy 1e+30 MeV, out of range (above 1e+07 MeV, 10 TeV)"),
        ("overflow", overflow, e.clusters, np.float64,
         "'point' value 1e+39 (time of row 4) is out of range: it overflows float32"),
        ("big_coordinate", big_coordinate, e.clusters, np.float64,
         "1 points lie outside the 768x768x768 voxel box (first: point 0 at voxel (1e+39"),
        ("negative_size", e.points, negative, np.float32, "cluster 1 has a negative size (-3 points)"),
    ]


def test_absurd_values_are_named_and_counted_by_skip_and_scan(tmp_path, rng):
    good = random_event(rng, 1)
    for name, points, clusters, dtype, problem in _absurd_cases(rng):
        path = tmp_path / f"{name}.h5"
        write_raw(path, [good.points, points], [good.clusters, clusters], point_dtype=dtype)
        message = re.escape(f"{path}: event 1: {problem}")
        with pytest.raises(DataError, match=message):
            read_pilarnet_event(path, 1)
        assert read_pilarnet_event(path, 0).points.dtype == np.float32
        with pytest.raises(DataError, match=message):
            PILArNetDataset(path)[1]
        lenient = PILArNetDataset(path, on_error="skip")
        assert_same_event(lenient[1], good)  # the good event stands in
        assert len(lenient.skipped) == 1 and re.match(message, str(lenient.skipped[0]))
        report = PILArNetDataset(path, on_error="skip").scan()
        assert report.n_checked == 2 and report.n_skipped == 1, name
        with pytest.raises(DataError, match=re.escape(problem)):  # the writer refuses them too
            write_pilarnet(tmp_path / "out.h5", [LArEvent(points, clusters)])


def test_the_box_follows_the_geometry(tmp_path, rng):
    from pcfm.data import LArTPCDataset
    from pcfm.geometry import VoxelGridGeometry

    event = random_event(rng, 1)
    event.points[:, :3] = np.minimum(event.points[:, :3], 99.0)
    event.points[0, :3] = [150.0, 10.0, 10.0]
    path = tmp_path / "small_box.h5"
    write_pilarnet(path, [event])  # inside the default 768^3 box
    small = VoxelGridGeometry("small-box", shape=(200, 100, 100))
    assert len(LArTPCDataset(path, small)) == 1 and LArTPCDataset(path, small)[0].num_nodes == event.points.shape[0]
    with pytest.raises(DataError, match=re.escape("1 points lie outside the 100x100x100 voxel box")):
        PILArNetDataset(path, box_voxels=(100, 100, 100))[0]


def test_validate_names_a_negative_cluster_size(rng):
    event = random_event(rng, 3)
    clusters = event.clusters.copy()
    clusters[:2, 0] = [clusters[0, 0] + clusters[1, 0] + 3, -3]  # the sizes still sum to the points
    with pytest.raises(DataError, match=r"f\.h5: event 7: cluster 1 has a negative size \(-3 points\)"):
        LArEvent(event.points, clusters).validate("f.h5", 7)
