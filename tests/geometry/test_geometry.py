import re

import numpy as np
import pytest
import yaml

import pcfm.geometry as geometry
from pcfm.errors import DataError, GeometryError
from pcfm.geometry import CylindricalGeometry, VoxelGridGeometry

XML_FOR_PRESET = {
    "calochallenge-ds1-photons": ("binning_dataset_1_photons.xml", 368, 22),
    "calochallenge-ds1-pions": ("binning_dataset_1_pions.xml", 533, 211),
    "calochallenge-ds2": ("binning_dataset_2.xml", 6480, 11),
    "calochallenge-ds3": ("binning_dataset_3.xml", 40500, 11),
}
CALORIMETERS = ["calochallenge-ds1-photons", "calochallenge-ds1-pions", "calochallenge-ds2",
                "calochallenge-ds3", "par04-scipb"]


@pytest.mark.parametrize("name", sorted(XML_FOR_PRESET))
def test_binning_xml_reproduces_preset(shared_data, name):
    file, n_cells, pdg = XML_FOR_PRESET[name]
    binning = geometry.read_binning_xml(shared_data / "calochallenge_binning" / file)
    assert binning.n_cells == n_cells
    assert binning.particle_pdg == pdg
    preset = geometry.get(name)
    assert preset.n_cells == n_cells
    ours = geometry.geometry_binning(preset)
    assert [l.id for l in ours.layers] == [l.id for l in binning.layers]
    for mine, theirs in zip(ours.layers, binning.layers):
        assert mine.n_alpha == theirs.n_alpha
        np.testing.assert_allclose(mine.r_edges_mm, theirs.r_edges_mm, rtol=0, atol=1e-9)


def test_geometry_from_binning_xml_takes_structure_per_layer(shared_data):
    preset = geometry.get("calochallenge-ds1-pions")
    by_id = {l.id: l.structure for l in preset.layers}
    built = geometry.geometry_from_binning_xml(
        shared_data / "calochallenge_binning" / "binning_dataset_1_pions.xml", "my-ds1", by_id.__getitem__)
    assert built.n_cells == 533 and built.layer_ids == [0, 1, 2, 3, 12, 13, 14]
    np.testing.assert_allclose(built.layer_x0()[-1], preset.layer_x0()[-1])  # no gap: same material


def test_bad_binning_xml_names_file(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<Bins><Bin><Layer id='0' r_edges='0,5,3' n_bin_alpha='1'/></Bin></Bins>")
    with pytest.raises(DataError, match=r"broken\.xml: layer 0: radial edges do not increase"):
        geometry.read_binning_xml(bad)
    bad.write_text("not xml at all <")
    with pytest.raises(DataError, match=r"broken\.xml: not a readable binning XML"):
        geometry.read_binning_xml(bad)


def test_dataset2_shape_order_and_physics():
    ds2 = geometry.get("calochallenge-ds2")
    assert ds2.shape == (45, 16, 9)
    assert ds2.depth_mm == pytest.approx(45 * 3.4)
    # two periods of 1.4 mm W + 0.3 mm Si: about 0.8 X0 per readout layer
    assert np.diff(ds2.layer_x0())[0] == pytest.approx(2 * (1.4 / 3.504 + 0.3 / 93.70), rel=1e-6)
    s = ds2.layers[0].structure
    assert 10.0 < s.moliere_radius_mm < 12.0
    assert 0.03 < s.mip_sampling_fraction < 0.04
    # radial index fastest: (layer 3, alpha 5, r 2) is 3*144 + 5*9 + 2
    index = ds2.cell_index(3, 5, 2)
    assert index == 3 * 144 + 5 * 9 + 2
    np.testing.assert_array_equal(ds2.cell_bins([index])[0], [3, 5, 2])
    r, alpha, z = ds2.cylindrical([index])[0]
    assert 9.3 <= r < 13.95 and 3 * 3.4 <= z < 4 * 3.4
    assert -np.pi + 5 * 2 * np.pi / 16 <= alpha < -np.pi + 6 * 2 * np.pi / 16
    dr, arc, dz = ds2.sizes([index])[0]
    assert dr == pytest.approx(4.65) and dz == pytest.approx(3.4) and arc == pytest.approx(r * 2 * np.pi / 16)


@pytest.mark.parametrize("name", CALORIMETERS)
def test_centres_locate_to_their_own_cell(name):
    geo = geometry.get(name)
    np.testing.assert_array_equal(geo.locate(geo.centers()), np.arange(geo.n_cells))


@pytest.mark.parametrize("name", ["calochallenge-ds2", "par04-scipb"])
def test_uniform_fast_path_agrees_with_general_search(name):
    fast = geometry.get(name)
    general = CylindricalGeometry.from_dict(fast.to_dict())
    general.__dict__["_uniform_mesh"] = None  # force the searchsorted path
    rng = np.random.default_rng(0)
    pos = rng.normal(0, 30, (20000, 3))
    pos[:, 2] = rng.uniform(-10, fast.depth_mm + 10, 20000)
    np.testing.assert_array_equal(fast.locate(pos), general.locate(pos))
    assert (fast.locate(pos) == -1).any() and (fast.locate(pos) >= 0).any()


def test_locate_outside_and_gaps():
    ds1 = geometry.get("calochallenge-ds1-pions")
    emb3, tile0 = ds1.layers[3], ds1.layers[4]
    assert tile0.z_front_mm - emb3.z_back_mm == pytest.approx(200.0)
    in_gap = [[1.0, 0.0, emb3.z_back_mm + 100.0]]
    behind = [[1.0, 0.0, ds1.depth_mm + 1.0]]
    too_wide = [[5000.0, 0.0, 1.0]]
    assert list(ds1.locate(np.array(in_gap + behind + too_wide + [[1.0, 0.0, -1.0]]))) == [-1, -1, -1, -1]


def test_round_trip_through_yaml(tmp_path):
    for name in CALORIMETERS + ["lartpc-768"]:
        geo = geometry.get(name)
        path = tmp_path / f"{name}.yaml"
        geometry.save_yaml(geo, path)
        again = geometry.get(path)
        assert again.to_dict() == geo.to_dict()
        assert again.n_cells == geo.n_cells


def test_user_geometry_in_configs_folder(tmp_path, monkeypatch):
    spec = {
        "name": "my-pbwo4", "kind": "calorimeter", "readout_threshold_mev": 0.1,
        "layers": [{"repeat": 10, "sensor": "PbWO4", "sensor_mm": 22.0, "n_alpha": 8,
                    "r_bins": {"count": 5, "width_mm": 10.0}}],
    }
    folder = tmp_path / "configs" / "geometries"
    folder.mkdir(parents=True)
    (folder / "my-pbwo4.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert "my-pbwo4" in geometry.available()
    geo = geometry.get("my-pbwo4")
    assert geo.n_cells == 10 * 8 * 5 and geo.layers[0].structure.absorber is None
    assert geo.layers[0].structure.mip_sampling_fraction == 1.0  # homogeneous


def test_shipped_example_geometry_loads():
    from tests.conftest import PROJECT_ROOT
    for path in sorted((PROJECT_ROOT / "configs" / "geometries").glob("*.yaml")):
        geo = geometry.get(path)
        assert geo.n_cells > 0 and geo.name == path.stem


def test_errors_are_clear(tmp_path):
    with pytest.raises(GeometryError, match="unknown geometry 'nope'; available: .*calochallenge-ds2"):
        geometry.get("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "layers": [{"sensor": "Unobtainium", "sensor_mm": 1,
                                                               "r_edges_mm": [0, 1]}]}))
    with pytest.raises(GeometryError, match=r"bad\.yaml: unknown material 'Unobtainium'"):
        geometry.get(bad)
    bad.write_text(yaml.safe_dump({"name": "bad", "layers": [{"sensor": "Si", "r_edges_mm": [0, 1]}]}))
    with pytest.raises(GeometryError, match="layer group 0 lacks 'sensor_mm'"):
        geometry.get(bad)
    with pytest.raises(IndexError):
        geometry.get("calochallenge-ds2").cell_index(0, 16, 0)


def test_lartpc_voxel_grid():
    box = geometry.get("lartpc-768")
    assert isinstance(box, VoxelGridGeometry)
    assert box.n_cells == 768 ** 3 and box.pitch_mm == 3.0
    np.testing.assert_allclose(box.extent_mm, [2304.0] * 3)
    voxels = np.array([[0, 0, 0], [767, 10, 400]])
    mm = box.voxel_to_mm(voxels)
    np.testing.assert_allclose(mm[0], [1.5, 1.5, 1.5])
    index = box.locate(mm)
    np.testing.assert_array_equal(index, np.ravel_multi_index(voxels.T, box.shape))
    np.testing.assert_allclose(box.centers(index), mm)
    assert box.locate(np.array([[-0.1, 5, 5], [2304.0, 5, 5]])).tolist() == [-1, -1]
    with pytest.raises(GeometryError, match="ask for the centres of an index array"):
        box.centers()


@pytest.mark.parametrize("spec, problem", [
    ({"name": "bad", "layers": 5}, "'layers' must be a non-empty list of layer groups (mappings), got 5"),
    ({"name": "bad", "layers": [{"sensor": "Si", "sensor_mm": 1, "r_edges_mm": 5}]},
     "layer group 0: 'r_edges_mm' must be a list of numbers, got 5"),
    ({"name": "bad", "layers": [{"sensor": "Si", "sensor_mm": 1, "r_edges_mm": [0, 1]}, 7]},
     "layer group 1: must be a mapping of keys"),
    ({"name": "bad", "layers": [{"sensor": "Si", "sensor_mm": 1, "n_alpah": 16, "r_edges_mm": [0, 1]}]},
     "layer group 0: unknown key 'n_alpah'; known keys: repeat, id,"),
    ({"name": "bad", "layers": [{"sensor": "Si", "sensor_mm": 1, "r_bins": {"count": "nine", "width_mm": 1}}]},
     "layer group 0: r_bins: 'count' must be a whole number, got 'nine'"),
    ({"name": "bad", "treshold_mev": 0.1, "layers": [{"sensor": "Si", "sensor_mm": 1, "r_edges_mm": [0, 1]}]},
     "unknown key 'treshold_mev'"),
    ({"name": "bad", "kind": "voxel_grid", "shape": 768}, "'shape' must be a list of 3 whole numbers, got 768"),
])
def test_a_bad_schema_names_the_file_and_the_key(tmp_path, spec, problem):
    """Once: "'int' object is not iterable", naming neither the file nor the key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(GeometryError) as err:
        geometry.get(bad)
    assert str(err.value).startswith(f"{bad}: geometry 'bad': {problem}")


def test_the_file_stem_must_equal_the_name(tmp_path, monkeypatch):
    spec = {"name": "my-calo", "layers": [{"sensor": "Si", "sensor_mm": 1.0, "r_edges_mm": [0, 1]}]}
    other = tmp_path / "other-name.yaml"
    other.write_text(yaml.safe_dump(spec))
    rule = re.escape(f"{other}: defines geometry 'my-calo', but a geometry file's stem must equal its name")
    with pytest.raises(GeometryError, match=rule):
        geometry.get(other)
    folder = tmp_path / "configs" / "geometries"
    folder.mkdir(parents=True)
    (folder / "other-name.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GeometryError, match="stem must equal its name"):
        geometry.get("other-name")
    right = tmp_path / "my-calo.yaml"
    right.write_text(yaml.safe_dump(spec))
    assert geometry.get(right).n_cells == 1
