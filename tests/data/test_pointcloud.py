"""Point-cloud conversion of every detector, batching, cells <-> points round trips, and the
torch datasets (in memory, lazy CaloChallenge files with DataLoader workers, PILArNet-M)."""
import math

import h5py
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from pcfm import geometry as geometries
from pcfm.data.calochallenge import write_calochallenge
from pcfm.data.datasets import CaloChallengeDataset, LArTPCDataset, ShowerDataset
from pcfm.data.events import ELECTRON, PHOTON, PION, CaloShowers, LArEvent
from pcfm.data.pointcloud import (POINT_FEATURES, PointsOutsideWarning, cloud_to_data, data_to_showers,
                                  lartpc_to_data, shower_to_data)
from pcfm.errors import DataError

CALO_PRESETS = ["calochallenge-ds1-photons", "calochallenge-ds1-pions", "calochallenge-ds2",
                "calochallenge-ds3", "par04-scipb"]
from tests.conftest import SHARED_DATA  # noqa: E402  ../shared/data beside the project root


def sparse_showers(name, n=3, seed=0, fill=0.3, **extras) -> CaloShowers:
    rng = np.random.default_rng(seed)
    n_cells = geometries.get(name).n_cells
    cells = (rng.random((n, n_cells)) < fill) * rng.uniform(0.02, 50.0, (n, n_cells))
    cells[:, 0] = 1.0
    return CaloShowers(rng.uniform(1e3, 1e5, n).astype(np.float32), cells.astype(np.float32), name, **extras)


# --- calorimeter showers -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CALO_PRESETS)
def test_every_calorimeter_preset_converts_to_physical_points_and_back_exactly(name):
    geometry = geometries.get(name)
    full = CaloShowers([1000.0], np.full((1, geometry.n_cells), 2.0, np.float32), name)
    data = shower_to_data(full, 0)
    assert data.num_nodes == geometry.n_cells and data.geometry == name
    np.testing.assert_array_equal(data.pos.numpy(), geometry.centers().astype(np.float32))
    np.testing.assert_array_equal(data.x[:, 1:].numpy(), geometry.sizes().astype(np.float32))
    np.testing.assert_allclose(data.x[:, 0].numpy(), math.log(2.0), rtol=1e-6)
    assert data.pos.dtype == torch.float32 and data.x.dtype == torch.float32 and data.cell.dtype == torch.long
    # points lie inside the calorimeter: depth within the layers, radius within the outer edge
    z, radius = data.pos[:, 2].double(), torch.linalg.norm(data.pos[:, :2].double(), dim=1)
    assert z.min() > 0 and z.max() < geometry.depth_mm
    assert radius.max() < max(layer.r_edges_mm[-1] for layer in geometry.layers)

    showers = sparse_showers(name)
    back = data_to_showers([shower_to_data(showers, i, threshold=0.0) for i in range(len(showers))], name)
    np.testing.assert_array_equal(back.showers, showers.showers)
    np.testing.assert_array_equal(back.incident_energies, showers.incident_energies)
    assert back.geometry == name


def test_point_features_and_event_fields():
    assert POINT_FEATURES == ("log_energy", "size_r", "size_arc", "size_z")
    showers = sparse_showers("calochallenge-ds2", theta=[0.5, 0.6, 0.7], phi=[0.1, 0.2, 0.3],
                             particle=[ELECTRON, PHOTON, 2212])
    data = shower_to_data(showers, 1)
    cells = showers.showers[1]
    kept = np.flatnonzero(cells >= 0.01515)
    np.testing.assert_array_equal(data.cell.numpy(), kept)
    np.testing.assert_array_equal(data.energy.numpy(), cells[kept])
    np.testing.assert_allclose(data.x[:, 0].numpy(), np.log(cells[kept]), rtol=1e-6)
    # dataset 2 cells: 4.65 mm radial width, arc = r_mid * 2 pi / 16, depth 3.4 mm
    r_mid = (data.cell.numpy() % 9 + 0.5) * 4.65
    np.testing.assert_allclose(data.x[:, 1].numpy(), 4.65, rtol=1e-6)
    np.testing.assert_allclose(data.x[:, 2].numpy(), r_mid * 2 * np.pi / 16, rtol=1e-6)
    np.testing.assert_allclose(data.x[:, 3].numpy(), 3.4, rtol=1e-6)
    assert data.incident_energy.tolist() == [float(showers.incident_energies[1])]
    assert data.theta.tolist() == [pytest.approx(0.6)] and data.phi.tolist() == [pytest.approx(0.2)]
    assert data.particle.tolist() == [PHOTON] and data.y.tolist() == [1]
    assert shower_to_data(showers, 2).y.tolist() == [-1]  # a proton is none of PARTICLE_CLASSES

    unknown = shower_to_data(CaloShowers(showers.incident_energies, showers.showers, "calochallenge-ds2"), 0)
    assert "y" not in unknown and unknown.particle.tolist() == [0]
    assert math.isnan(unknown.theta.item()) and math.isnan(unknown.phi.item())


def test_threshold_drops_cells_below_the_readout_threshold():
    cells = np.zeros((1, 6480), np.float32)
    cells[0, [10, 20, 30, 40]] = [0.01, 0.01515, 0.02, 5.0]
    showers = CaloShowers([5000.0], cells, "calochallenge-ds2")
    data = shower_to_data(showers, 0)
    assert data.cell.tolist() == [20, 30, 40]  # >= 15.15 keV kept, as the official evaluation
    assert shower_to_data(showers, 0, threshold=0.0).cell.tolist() == [10, 20, 30, 40]
    back = data_to_showers(data, "calochallenge-ds2").showers[0]
    assert back[10] == 0 and back[[20, 30, 40]].tolist() == cells[0, [20, 30, 40]].tolist()


def test_batching_ragged_showers_of_several_geometries():
    ds2 = sparse_showers("calochallenge-ds2", n=2, particle=[ELECTRON, ELECTRON])
    photons = sparse_showers("calochallenge-ds1-photons", n=1, seed=3, particle=[PHOTON])
    graphs = [shower_to_data(ds2, 0), shower_to_data(photons, 0), shower_to_data(ds2, 1)]
    sizes = [g.num_nodes for g in graphs]
    assert len(set(sizes)) == 3
    batch = Batch.from_data_list(graphs)
    assert batch.ptr.tolist() == [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    assert batch.batch.tolist() == sum(([i] * n for i, n in enumerate(sizes)), [])
    assert batch.geometry == ["calochallenge-ds2", "calochallenge-ds1-photons", "calochallenge-ds2"]
    assert batch.y.tolist() == [0, 1, 0] and batch.incident_energy.shape == (3,)
    assert batch.x.shape == (sum(sizes), 4)

    only_ds2 = Batch.from_data_list([shower_to_data(ds2, i, threshold=0.0) for i in range(2)])
    back = data_to_showers(only_ds2, "calochallenge-ds2")
    np.testing.assert_array_equal(back.showers, ds2.showers)
    np.testing.assert_array_equal(back.particle, ds2.particle)


def test_generated_points_are_summed_per_cell_and_outside_points_reported():
    geometry = geometries.get("calochallenge-ds2")
    centre = geometry.centers([479])[0]
    inside = [[*centre, 1.5], [*(centre + 0.1), 2.5]]  # two points in cell 479
    outside = [[0.0, 0.0, -5.0, 7.0], [100.0, 0.0, 10.0, 1.0]]  # in front of the calorimeter; beyond 9 bins
    clouds = [cloud_to_data(np.array(inside), 1000.0), cloud_to_data(np.array(inside[:1] + outside), 2000.0)]
    with pytest.warns(PointsOutsideWarning, match="2 point\\(s\\) carrying 8 MeV") as record:
        showers = data_to_showers(clouds, geometry)
    assert record[0].message.n_outside.tolist() == [0, 2]
    assert record[0].message.energy_outside.tolist() == [0.0, 8.0]
    assert showers.showers[0, 479] == 4.0 and showers.showers[0].sum() == 4.0
    assert showers.showers[1, 479] == 1.5 and showers.showers[1].sum() == 1.5
    assert showers.incident_energies.tolist() == [1000.0, 2000.0]
    assert showers.theta is None and showers.particle is None
    with pytest.raises(DataError, match="event 1: 2 point\\(s\\) lie outside"):
        data_to_showers(clouds, geometry, on_outside="raise")


# --- CaloClouds point clouds ---------------------------------------------------------------------
def test_caloclouds_real_showers_convert_with_all_their_points():
    path = SHARED_DATA / "caloclouds3_mini_sample.hdf5"
    if not path.is_file():
        pytest.skip(f"shared test data not found: {path} (the ../shared/data folder is absent)")
    with h5py.File(path, "r") as f:
        events, incident_gev = f["events"][:], f["energy"][:, 0]
    graphs = []
    for event, energy in zip(events, incident_gev):
        points = event.astype(np.float64)
        points[:, 3] *= 1000.0  # GeV -> MeV; y stays in layer units as stored
        graphs.append(cloud_to_data(points, energy * 1000.0))
    assert [g.num_nodes for g in graphs] == [163, 236]
    for graph, event, energy in zip(graphs, events, incident_gev):
        real = event[event[:, 3] > 0]
        np.testing.assert_array_equal(graph.pos.numpy(), real[:, :3])
        np.testing.assert_allclose(graph.energy.numpy(), real[:, 3] * 1000.0, rtol=1e-6)
        np.testing.assert_allclose(graph.x[:, 0].numpy(), np.log(real[:, 3] * 1000.0), rtol=1e-5, atol=1e-5)
        assert graph.x[:, 1:].abs().sum() == 0 and graph.cell.eq(-1).all()
        assert graph.incident_energy.item() == pytest.approx(energy * 1000.0)
        assert graph.geometry == ""
    batch = Batch.from_data_list(graphs)
    assert batch.ptr.tolist() == [0, 163, 399]


def test_cloud_with_geometry_gets_cells_and_bad_clouds_are_refused():
    geometry = geometries.get("calochallenge-ds2")
    centres = geometry.centers([0, 100])
    points = np.column_stack([np.vstack([centres, [[0.0, 0.0, -1.0]]]), [1.0, 2.0, 3.0]])
    data = cloud_to_data(np.vstack([points, np.zeros((2, 4))]), 500.0, geometry, particle=PION)
    assert data.cell.tolist() == [0, 100, -1] and data.y.tolist() == [2]
    np.testing.assert_allclose(data.x[:2, 1:].numpy(), geometry.sizes([0, 100]), rtol=1e-6)
    assert data.x[2, 1:].tolist() == [0.0, 0.0, 0.0]
    points[1, 3] = -1.0
    with pytest.raises(DataError, match="f.h5: event 3: 1 points have negative energy"):
        cloud_to_data(points, 500.0, path="f.h5", event=3)


# --- LArTPC --------------------------------------------------------------------------------------
def lar_event(version=2) -> LArEvent:
    voxels = np.array([[0, 0, 0], [10, 20, 30], [767, 1, 2], [5, 5, 5], [6, 5, 5], [100, 200, 300]], np.float32)
    points = np.zeros((6, 8), np.float32)
    points[:, :3] = voxels
    points[:, 3] = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    # clusters: size, fragment, group, interaction, semantic[, particle id]
    clusters = np.array([[2, 0, 0, 0, 4, -1], [3, 1, 1, 0, 0, 1], [1, 2, 2, 0, 1, 2]])
    extra = np.zeros((3, 5), np.float32) if version == 2 else None
    return LArEvent(points, clusters if version == 2 else clusters[:, :5], extra)


def test_lartpc_event_converts_with_exact_labels():
    data = lartpc_to_data(lar_event())
    assert data.semantic.tolist() == [4, 4, 0, 0, 0, 1]
    assert data.particle_id.tolist() == [-1, -1, 1, 1, 1, 2]
    np.testing.assert_array_equal(data.pos[1].numpy(), [31.5, 61.5, 91.5])  # (voxel + 0.5) * 3 mm
    np.testing.assert_array_equal(data.pos[2].numpy(), [2302.5, 4.5, 7.5])
    assert data.x[:, 1:].unique().tolist() == [3.0]
    assert data.x[0, 0].item() == pytest.approx(math.log(1e-6))  # zero energy floored, finite
    assert data.x[5, 0].item() == pytest.approx(math.log(8.0))
    assert data.geometry == "lartpc-768" and "y" not in data
    v1 = lartpc_to_data(lar_event(version=1), y=3)
    assert "particle_id" not in v1 and v1.y.tolist() == [3]


# --- datasets ------------------------------------------------------------------------------------
def test_shower_dataset_yields_the_conversion_of_each_shower():
    showers = sparse_showers("calochallenge-ds1-pions", n=4)
    dataset = ShowerDataset(showers)
    assert len(dataset) == 4
    assert torch.equal(dataset[2].cell, shower_to_data(showers, 2).cell)
    assert dataset.event_sizes().tolist() == np.count_nonzero(showers.showers, axis=1).tolist()


def test_calochallenge_dataset_with_two_workers_sees_every_event_once(tmp_path):
    first = sparse_showers("calochallenge-ds2", n=7, seed=1, fill=0.05)
    second = sparse_showers("calochallenge-ds2", n=6, seed=2, fill=0.05)
    second.incident_energies += 2e5  # all incident energies distinct: they identify the events
    write_calochallenge(tmp_path / "a.h5", first, chunk_events=2)
    write_calochallenge(tmp_path / "b.h5", second, chunk_events=2)
    dataset = CaloChallengeDataset(str(tmp_path / "*.h5"))
    assert len(dataset) == 13 and dataset.file_geometries == ["calochallenge-ds2"] * 2
    expected_sizes = np.count_nonzero(np.vstack([first.showers, second.showers]) >= 0.01515, axis=1)
    np.testing.assert_array_equal(dataset.event_sizes(), expected_sizes)

    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=True)
    seen = []
    for batch in loader:
        sizes = torch.diff(batch.ptr)
        assert torch.equal(torch.bincount(batch.batch, minlength=batch.num_graphs), sizes)
        seen += batch.incident_energy.tolist()
    expected = np.concatenate([first.incident_energies, second.incident_energies]).tolist()
    assert sorted(seen) == sorted(expected)

    data = dataset[9]  # event 2 of b.h5
    reference = shower_to_data(second, 2)
    assert torch.equal(data.cell, reference.cell) and torch.equal(data.energy, reference.energy)


def test_calochallenge_dataset_names_bad_events_and_filters_small_ones(tmp_path):
    showers = sparse_showers("calochallenge-ds2", n=4, fill=0.01)
    showers.showers[1] = 0.0
    showers.showers[1, 0] = 1.0  # a one-point shower
    path = tmp_path / "a.h5"
    write_calochallenge(path, showers)
    with h5py.File(path, "r+") as f:
        f["showers"][3, 5] = np.nan
    dataset = CaloChallengeDataset(path, "calochallenge-ds2")
    with pytest.raises(DataError, match=f"{path}: event 3: non-finite"):
        dataset[3]
    assert len(CaloChallengeDataset(path, min_points=2)) == 3


def test_lartpc_dataset_wraps_the_pilarnet_reader(tmp_path):
    pilarnet = pytest.importorskip("pcfm.data.pilarnet", reason="the PILArNet-M reader is not available")
    path = tmp_path / "lar.h5"
    full = lar_event()
    short = LArEvent(full.points[:5], full.clusters[:2], full.cluster_extra[:2])  # drop the track cluster
    pilarnet.write_pilarnet(path, [full, short])
    dataset = LArTPCDataset(path)
    assert len(dataset) == 2 and dataset.event_sizes().tolist() == [6, 5]
    assert dataset[0].semantic.tolist() == [4, 4, 0, 0, 0, 1]
    assert dataset[1].particle_id.tolist() == [-1, -1, 1, 1, 1]
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch.ptr.tolist() == [0, 6, 11] and batch.geometry == ["lartpc-768", "lartpc-768"]


def test_event_class_ignores_the_charge():
    from pcfm.data import CaloShowers, shower_to_data
    from pcfm.geometry import get

    geo = get("calochallenge-ds1-photons")
    cells = np.zeros((4, geo.n_cells), np.float32)
    cells[:, 0] = 10.0
    showers = CaloShowers(np.full(4, 1000.0), cells, geo.name, particle=np.array([11, -11, 211, -211]))
    assert [int(shower_to_data(showers, i, geo).y) for i in range(4)] == [0, 0, 2, 2]


def test_batching_keeps_the_cells_of_each_event():
    """PyG offsets keys containing 'index' when batching; the cell field must not be one."""
    from torch_geometric.data import Batch

    from pcfm.data import CaloShowers, shower_to_data
    from pcfm.geometry import get

    geo = get("calochallenge-ds1-photons")
    cells = np.zeros((2, geo.n_cells), np.float32)
    cells[0, [3, 7]] = 5.0
    cells[1, [3, 9]] = 5.0
    showers = CaloShowers(np.full(2, 1000.0), cells, geo.name)
    batch = Batch.from_data_list([shower_to_data(showers, i, geo) for i in range(2)])
    assert batch.cell.tolist() == [3, 7, 3, 9]
