"""generate(): a pretrained diffusion checkpoint to point clouds, cells and a CaloChallenge file."""
import numpy as np
import pytest
import torch

import pcfm.api
from pcfm.data import ShowerDataset, data_to_showers, read_calochallenge
from pcfm.api import generate
from pcfm.errors import PcfmError
from pcfm.sim import simulate_showers
from pcfm.tasks.pretrain import CheckpointError, PretrainModule

GEOMETRY = "calochallenge-ds2"
TRANSFORM = {"kind": "power", "exponent": 0.5}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny diffusion model pretrained for a few steps on low-energy showers (10-60 points)."""
    showers = simulate_showers(GEOMETRY, 24, energy=(100.0, 300.0), seed=0)
    return pcfm.api.pretrain("diffusion", data=ShowerDataset(showers), model="tiny", max_steps=3, batch_points=600,
                             val_fraction=0, workdir=tmp_path_factory.mktemp("run"), progress=False,
                             objective_options={"diffusion": {"energy_transform": TRANSFORM}})


def test_generate_writes_a_valid_calochallenge_file(pretrained, tmp_path, capsys):
    energies = np.array([150.0, 200.0, 250.0, 120.0, 180.0])
    out = tmp_path / "generated.h5"
    result = generate(pretrained.checkpoint_path, GEOMETRY, energies, theta=1.4, steps=4, batch_size=2,
                      device="cpu", seed=0, out=out)
    assert "5/5 showers sampled" in capsys.readouterr().out  # three batches: progress is printed
    assert result.path == out and result.seconds > 0
    written = read_calochallenge(out)
    assert len(written) == 5 and written.geometry == GEOMETRY
    np.testing.assert_allclose(written.incident_energies, energies, rtol=1e-7)
    np.testing.assert_allclose(written.theta, 1.4, rtol=1e-7)
    assert np.all(written.showers.sum(1) > 0)
    np.testing.assert_array_equal(written.showers, result.showers.showers)
    # the cells are the points summed into the geometry, cells below threshold zeroed
    assert len(result.points) == 5
    for data, energy in zip(result.points, energies):
        assert data.geometry == GEOMETRY and float(data.incident_energy) == pytest.approx(energy)
        assert torch.all(torch.isfinite(data.pos)) and torch.all(data.energy > 0)
    redeposited = data_to_showers(result.points, GEOMETRY, on_outside="ignore").showers
    redeposited[redeposited < 0.01515] = 0
    np.testing.assert_allclose(result.showers.showers, redeposited, rtol=1e-5, atol=1e-6)
    outside = np.array([float(d.energy[d.cell < 0].sum()) for d in result.points])
    np.testing.assert_allclose(result.energy_outside, outside, rtol=1e-4, atol=1e-6)


def test_the_energy_transform_survives_the_checkpoint(pretrained):
    trained = pretrained.module.objectives["diffusion"]
    loaded = PretrainModule.load_from_checkpoint(pretrained.checkpoint_path).objectives["diffusion"]
    stored = loaded.energy_transform.to_dict()
    assert stored == trained.energy_transform.to_dict()
    assert stored["kind"] == "power" and stored["exponent"] == 0.5 and stored["std"] != 1.0
    assert torch.equal(loaded.position_scale, trained.position_scale)
    assert torch.equal(loaded.n_points_quantiles, trained.n_points_quantiles)
    # generation from the file and from the module in memory agree exactly, and are seeded
    options = dict(steps=3, device="cpu", seed=5)
    from_file = generate(pretrained.checkpoint_path, GEOMETRY, [200.0, 140.0], **options)
    in_memory = generate(pretrained.module, GEOMETRY, [200.0, 140.0], **options)
    np.testing.assert_array_equal(from_file.showers.showers, in_memory.showers.showers)
    for a, b in zip(from_file.points, in_memory.points):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.energy, b.energy)
    other_seed = generate(pretrained.module, GEOMETRY, [200.0, 140.0], **{**options, "seed": 6})
    assert not np.array_equal(other_seed.showers.showers, in_memory.showers.showers)


def test_points_only_geometry_and_given_numbers_of_points(pretrained):
    result = generate(pretrained.module, "lartpc-768", [1e3, 2e3], n_points=[4, 9], steps=2, device="cpu",
                      seed=0, sampler="stochastic")
    assert result.showers is None and result.energy_outside is None and result.path is None
    assert [d.num_nodes <= n for d, n in zip(result.points, (4, 9))] == [True, True]
    assert all(d.geometry == "lartpc-768" for d in result.points)


def test_bad_requests_raise(pretrained, tmp_path):
    with pytest.raises(ValueError, match="shower 1 has -5.0"):
        generate(pretrained.module, GEOMETRY, [100.0, -5.0], device="cpu")
    with pytest.raises(ValueError, match="need a calorimeter geometry; 'lartpc-768' is a voxel_grid"):
        generate(pretrained.module, "lartpc-768", [100.0], n_points=3, out=tmp_path / "x.h5", device="cpu")
    with pytest.raises(ValueError, match="theta must be one value or one per shower"):
        generate(pretrained.module, GEOMETRY, [100.0, 120.0], theta=[1.0, 1.2, 1.3], device="cpu")
    no_diffusion = r"holds no diffusion objective to generate with \(objectives: \['mpm'\]\)"
    with pytest.raises(CheckpointError, match=no_diffusion):
        generate(PretrainModule({"width": 32, "heads": 2, "cond_dim": 16}, objectives="mpm"), GEOMETRY, [100.0],
                 device="cpu")
    assert not (tmp_path / "x.h5").exists()


def test_calibrated_showers_carry_the_drawn_visible_energies(pretrained, monkeypatch):
    energies = np.array([150.0, 200.0, 250.0, 120.0])
    diffusion = pretrained.module.objectives["diffusion"]
    assert diffusion.has_visible_energy_model(GEOMETRY) and not diffusion.has_visible_energy_model("par04-scipb")
    # a few-step model puts its points anywhere: the sampler is replaced by real showers' points
    real = ShowerDataset(simulate_showers(GEOMETRY, 4, energy=(100.0, 300.0), seed=9))

    def sample(backbone, template, **options):
        counts = torch.bincount(template.batch).tolist()
        pos = [np.resize(real[i].pos.numpy(), (n, 3)) for i, n in enumerate(counts)]
        energy = [np.resize(real[i].energy.numpy(), n) for i, n in enumerate(counts)]
        return torch.from_numpy(np.concatenate(pos)), torch.from_numpy(np.concatenate(energy))

    drawn = []

    def draw(incident_energy, geometry, n_points, generator):
        drawn.append(np.asarray(n_points).copy())
        return torch.as_tensor(0.8 * np.asarray(incident_energy), dtype=torch.float32)

    monkeypatch.setattr(diffusion, "sample", sample)
    monkeypatch.setattr(diffusion, "sample_visible_energy", draw)
    calibrated = generate(pretrained.module, GEOMETRY, energies, device="cpu", seed=0)
    raw = generate(pretrained.module, GEOMETRY, energies, device="cpu", seed=0, calibrate_energy=False)
    assert calibrated.energy_calibrated and not raw.energy_calibrated
    assert len(drawn) == 1 and np.array_equal(drawn[0], [d.num_nodes for d in raw.points])  # given the counts
    # the cells hold the drawn totals, up to the cells that fall below threshold after rescaling
    np.testing.assert_allclose(calibrated.showers.showers.sum(1), 0.8 * energies, rtol=0.02)
    assert not np.allclose(raw.showers.showers.sum(1), 0.8 * energies, rtol=0.1)
    # the shape is the sampler's: the calibrated cells are the raw ones scaled
    scale = calibrated.showers.showers.sum(1, keepdims=True) / raw.showers.showers.sum(1, keepdims=True)
    both = (calibrated.showers.showers > 0) & (raw.showers.showers > 0)
    np.testing.assert_allclose(calibrated.showers.showers[both], (raw.showers.showers * scale)[both], rtol=0.05)


def test_a_checkpoint_without_the_visible_energy_model_still_loads_and_generates(pretrained, tmp_path):
    stored = torch.load(pretrained.checkpoint_path, map_location="cpu", weights_only=False)
    for key in [k for k in stored["state_dict"] if "visible_energy" in k or "points_energy_correlation" in k]:
        del stored["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(stored, old)
    module = PretrainModule.load_from_checkpoint(old)
    assert not module.objectives["diffusion"].has_visible_energy_model(GEOMETRY)
    result = generate(module, GEOMETRY, [150.0, 200.0], steps=2, device="cpu", seed=0)
    assert not result.energy_calibrated and result.showers.showers.shape[0] == 2
    with pytest.raises(ValueError, match="visible-energy model saw no training events of geometry "
                                         "'calochallenge-ds2'.*calibrate_energy=False"):
        generate(module, GEOMETRY, [150.0], steps=2, device="cpu", calibrate_energy=True)


def test_showers_that_stay_empty_are_named_and_never_written(tmp_path):
    # two steps of diffusion on the default showers (GeV energies, log transform): the samples
    # scatter outside the cells, which redraws cannot fix
    untrained = pcfm.api.pretrain("diffusion", geometry=GEOMETRY, n_events=24, max_steps=2, batch_points=4000,
                                  val_fraction=0, workdir=tmp_path / "run", progress=False)
    out = tmp_path / "gen.h5"
    with pytest.raises(PcfmError, match=r"^generated shower \d \(incident energy 10000 MeV\)( and \d more of the 6 "
                                        r"\(showers? [\d, ]+\))? ha(s|ve) no cell above the readout threshold of "
                                        r"calochallenge-ds2 \(0\.01515 MeV\): the model generated no cell above it, "
                                        r"even after 3 redraws .* Nothing was written to .*gen\.h5\.$"):
        generate(untrained.checkpoint_path, GEOMETRY, [1e4] * 6, steps=2, device="cpu", seed=0, out=out)
    assert not out.exists()
    with pytest.warns(UserWarning, match=r"generated shower \d .* Is the model trained"):
        result = generate(untrained.checkpoint_path, GEOMETRY, [1e4] * 6, steps=2, device="cpu", seed=0)
    assert len(result.points) == 6


@pytest.mark.parametrize("energies, options, problem", [
    ([], {}, "energies: give at least one incident energy"),
    ([100.0, float("nan")], {}, "shower 1 has nan"),
    ([float("inf")], {}, "shower 0 has inf"),
    ([0.0], {}, "shower 0 has 0.0"),
    ([2e7], {}, r"at most 1e\+07 MeV; shower 0 has 20000000.0"),
    ([100.0], {"steps": 0}, "steps must be a whole number >= 1, got 0"),
    ([100.0], {"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
    ([100.0], {"theta": 4.0}, r"theta must lie in \(0, pi\) radians"),
    ([100.0], {"phi": float("nan")}, "phi must be finite"),
])
def test_bad_requests_are_argument_errors_before_the_checkpoint_is_read(tmp_path, energies, options, problem):
    from pcfm.errors import ArgumentError

    with pytest.raises(ArgumentError, match=problem):  # the checkpoint does not exist: not read
        generate(tmp_path / "missing.ckpt", GEOMETRY, energies, device="cpu", **options)


def test_showers_emptied_by_the_energy_calibration_are_named(pretrained, monkeypatch, tmp_path):
    """Once blamed on the output file ("gen.h5: event 1: empty shower")."""
    diffusion = pretrained.module.objectives["diffusion"]
    real = ShowerDataset(simulate_showers(GEOMETRY, 2, energy=(100.0, 300.0), seed=9))

    def sample(backbone, template, **options):  # real showers' points: none is empty before calibration
        counts = torch.bincount(template.batch).tolist()
        pos = [np.resize(real[i].pos.numpy(), (n, 3)) for i, n in enumerate(counts)]
        energy = [np.resize(real[i].energy.numpy(), n) for i, n in enumerate(counts)]
        return torch.from_numpy(np.concatenate(pos)), torch.from_numpy(np.concatenate(energy))

    def draw(incident_energy, geometry, n_points, generator):  # shower 1 gets a visible energy of 1 keV
        return torch.tensor([100.0, 1e-3])

    monkeypatch.setattr(diffusion, "sample", sample)
    monkeypatch.setattr(diffusion, "sample_visible_energy", draw)
    out = tmp_path / "gen.h5"
    with pytest.raises(PcfmError, match=r"^generated shower 1 \(incident energy 200 MeV\) has no cell above the "
                                        r"readout threshold of calochallenge-ds2 \(0\.01515 MeV\): once rescaled to "
                                        r"the visible energy drawn for it \(0\.001 MeV\), every cell the model "
                                        r"generated falls under it; calibrate_energy=False keeps the sampled totals\. "
                                        r"Nothing was written to .*gen\.h5\.$"):
        generate(pretrained.module, GEOMETRY, [150.0, 200.0], device="cpu", seed=0, out=out)
    assert not out.exists()
