"""Point diffusion: EDM formulas, samplers against exact solutions, training, points model, config."""
import json
import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import pcfm.geometry
from pcfm.data import ShowerDataset
from pcfm.data.pointcloud import lartpc_to_data
from pcfm.nn import BACKBONE_PRESETS, Backbone
from pcfm.sim import simulate_showers
from pcfm.tasks import get_objective_class
from pcfm.tasks.diffusion import PointDiffusion, dequantize_positions, located_cell_sizes
from pcfm.tasks.edm import (dpmpp2m_sampler, edm_loss_weight, edm_preconditioning, heun_sampler, karras_sigmas,
                            network_calls, stochastic_sampler)

GEOMETRY = "calochallenge-ds2"
BACKBONE_CONFIG = BACKBONE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def small_showers():
    """Eight low-energy showers of 10-60 points: cheap for the tiny backbone."""
    return ShowerDataset(simulate_showers(GEOMETRY, 8, energy=(100.0, 300.0), seed=1))


# ------------------------------------------------------------------ EDM formulas and samplers
def test_preconditioning_at_known_sigmas():
    sigma_data = 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor([0.5, 1e-8, 1e4]), sigma_data)
    # sigma = sigma_data: skip and output share equally
    assert c_skip[0] == pytest.approx(0.5) and c_out[0] == pytest.approx(0.5 / math.sqrt(2))
    assert c_in[0] == pytest.approx(1 / (0.5 * math.sqrt(2)))
    # no noise: D(x) = x; huge noise: D = F scaled to the data, input scaled to unit variance
    assert c_skip[1] == pytest.approx(1.0) and c_out[1] == pytest.approx(0.0, abs=1e-7)
    assert c_skip[2] == pytest.approx(0.0, abs=1e-8) and c_out[2] == pytest.approx(0.5, rel=1e-6)
    assert c_in[2] == pytest.approx(1e-4, rel=1e-6)
    torch.testing.assert_close(c_noise, torch.tensor([0.5, 1e-8, 1e4]).log() / 4)
    sigma = torch.logspace(-3, 2, 11)
    _, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    # the loss weight makes the effective target of F of unit weight at every sigma
    torch.testing.assert_close(edm_loss_weight(sigma, sigma_data) * c_out.square(), torch.ones(11))


def test_karras_schedule():
    sigmas = karras_sigmas(20, 0.002, 80.0, 7.0)
    assert len(sigmas) == 21 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    middle = (0.5 * 80.0 ** (1 / 7) + 0.5 * 0.002 ** (1 / 7)) ** 7  # i = (N-1)/2 is not a step for N=20
    assert karras_sigmas(3, 0.002, 80.0)[1] == pytest.approx(middle)
    assert karras_sigmas(1, 0.002, 80.0) == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        karras_sigmas(0, 0.002, 80.0)


def ragged_cloud(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(7 + 30, 4, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 3.0])


@pytest.mark.parametrize("name, sampler", [("heun", heun_sampler), ("dpmpp2m", dpmpp2m_sampler)])
def test_with_an_oracle_denoiser_a_sampler_reproduces_the_cloud_in_its_network_calls(name, sampler):
    clean = ragged_cloud()
    calls = []

    def oracle(x, sigma):
        calls.append(sigma)
        return clean

    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    sigmas = karras_sigmas(20, 0.002, 80.0)
    out = sampler(oracle, noise, sigmas)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-5)
    assert len(calls) == network_calls(name, 20) == {"heun": 2 * 20 - 1, "dpmpp2m": 20}[name]
    assert calls[0] == sigmas[0]


def test_network_calls_of_each_sampler():
    assert [network_calls(name, 6) for name in ("heun", "stochastic", "dpmpp2m")] == [11, 12, 6]
    with pytest.raises(ValueError, match="unknown sampler"):
        network_calls("euler", 6)


def test_heun_solves_the_gaussian_flow_to_second_order():
    # Data N(0, s^2): D(x; sigma) = x s^2 / (sigma^2 + s^2) and the flow is x(sigma) ~ sqrt(sigma^2 + s^2),
    # so the exact sample is noise * sigma_max * s / sqrt(sigma_max^2 + s^2).
    s = 0.7
    noise = torch.randn(100, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = noise * 80.0 * s / math.sqrt(80.0 ** 2 + s ** 2)

    def gaussian(x, sigma):
        return x * s ** 2 / (sigma ** 2 + s ** 2)

    def error(steps):
        out = heun_sampler(gaussian, noise, karras_sigmas(steps, 0.002, 80.0))
        return float(((out - exact) / exact).abs().max())

    errors = [error(steps) for steps in (20, 40, 80)]
    assert errors[0] < 0.05 and errors[2] < 0.003
    assert 3.5 < errors[0] / errors[1] < 4.8 and 3.5 < errors[1] / errors[2] < 4.8  # halving the step: error / 4


def test_dpmpp2m_solves_a_shifted_gaussian_flow_to_second_order_and_beats_heun_per_call():
    # Data N(mu, s^2): D(x; sigma) = mu + (x - mu) s^2 / (sigma^2 + s^2); the flow keeps
    # (x - mu) / sqrt(sigma^2 + s^2) fixed.
    s, sigma_max = 0.7, 80.0
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    noise = torch.randn(100, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = mu + (noise * sigma_max - mu) * s / math.sqrt(sigma_max ** 2 + s ** 2)

    def gaussian(x, sigma):
        return mu + (x - mu) * s ** 2 / (sigma ** 2 + s ** 2)

    def error(sampler, steps):
        return float((sampler(gaussian, noise, karras_sigmas(steps, 0.002, sigma_max)) - exact).abs().max())

    errors = [error(dpmpp2m_sampler, steps) for steps in (20, 40, 80)]
    assert errors[2] < 0.01
    assert 3.5 < errors[0] / errors[1] < 5.5 and 3.5 < errors[1] / errors[2] < 5.5  # halving the step: error / 4
    # at about the same number of network calls (20 against 19), DPM-Solver++(2M) is more accurate
    assert errors[0] < 0.5 * error(heun_sampler, 10)


def test_stochastic_sampler_is_seeded_and_samples_the_gaussian():
    s = 0.7
    gaussian = lambda x, sigma: x * s ** 2 / (sigma ** 2 + s ** 2)  # noqa: E731
    sigmas = karras_sigmas(80, 0.002, 80.0)  # small steps: the check is on the noise, not the solver

    def run(seed, denoise=gaussian, n=20_000):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        return stochastic_sampler(denoise, noise, sigmas, generator=generator, churn=40.0)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.std()) == pytest.approx(s, rel=0.02)  # churned noise does not change the law
    clean = ragged_cloud()
    generator = torch.Generator().manual_seed(4)
    out = stochastic_sampler(lambda x, sigma: clean, torch.randn(clean.shape, generator=generator), sigmas,
                             generator=generator)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the objective on showers
def test_model_sampling_with_an_oracle_returns_the_cloud_in_mm_and_mev(small_showers):
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG)
    objective.on_data(small_showers)
    events = [small_showers[i] for i in (0, 3, 5)]  # ragged: different numbers of points
    batch = Batch.from_data_list(events)
    clean = objective.to_state(batch.pos, batch.energy, None)
    seen_sigmas = []

    def oracle(backbone, template, noisy, sigma):
        assert sigma.shape == (3,) and torch.all(sigma == sigma[0])
        seen_sigmas.append(float(sigma[0]))
        return clean

    objective.denoise = oracle
    template = PointDiffusion.make_template(batch.incident_energy, [e.num_nodes for e in events], GEOMETRY)
    pos, energy = objective.sample(None, template, steps=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pos, batch.pos, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(energy, batch.energy, rtol=1e-4, atol=1e-6)
    assert len(seen_sigmas) == 11 and seen_sigmas[0] == pytest.approx(80.0)
    seen_sigmas.clear()
    pos, energy = objective.sample(None, template, steps=6, sampler="dpmpp2m")
    torch.testing.assert_close(pos, batch.pos, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(energy, batch.energy, rtol=1e-4, atol=1e-6)
    assert len(seen_sigmas) == 6
    with pytest.raises(ValueError, match="the dpmpp2m sampler takes no options"):
        objective.sample(None, template, sampler="dpmpp2m", churn=1.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        objective.sample(None, template, sampler="euler")


def test_a_diverged_denoiser_still_gives_finite_showers(small_showers):
    """An untrained model can denoise to huge log-energies; exp() of them must not reach inf / NaN."""
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG, energy_transform="log")
    objective.on_data(small_showers)
    events = [small_showers[i] for i in (0, 1)]
    objective.denoise = lambda backbone, template, noisy, sigma: torch.full_like(noisy, 1e4)
    template = PointDiffusion.make_template(torch.tensor([200.0, 250.0]), [e.num_nodes for e in events], GEOMETRY)
    pos, energy = objective.sample(None, template, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pos).all() and torch.isfinite(energy).all()


def test_loss_is_finite_and_decreases(small_showers):
    torch.manual_seed(0)
    backbone = Backbone(BACKBONE_CONFIG)
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG)
    objective.on_data(small_showers)
    batch = Batch.from_data_list([small_showers[i] for i in range(len(small_showers))])

    def evaluation_loss():
        backbone.eval(), objective.eval()
        with torch.no_grad():
            values = []
            for seed in range(3):
                torch.manual_seed(100 + seed)
                values.append(objective.loss(backbone, batch))
        backbone.train(), objective.train()
        return {key: float(np.mean([float(v[key]) for v in values])) for key in values[0]}

    before = evaluation_loss()
    assert all(math.isfinite(value) for value in before.values())
    assert before["loss"] == pytest.approx((3 * before["position_loss"] + before["energy_loss"]) / 4)
    optimiser = torch.optim.Adam([*backbone.parameters(), *objective.parameters()], lr=3e-3)
    for step in range(40):
        torch.manual_seed(step)
        terms = objective.loss(backbone, batch)
        assert torch.isfinite(terms["loss"])
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    after = evaluation_loss()
    # Deterministic (same seeds before and after). Most of the EDM loss is irreducible (about 1 at
    # the smallest and largest sigmas), so a few dozen steps lower it by a few per cent.
    assert after["loss"] < 0.97 * before["loss"] and after["position_loss"] < 0.96 * before["position_loss"]


def test_dequantisation_keeps_points_in_their_cells(small_showers):
    batch = Batch.from_data_list([small_showers[i] for i in range(4)])
    generator = torch.Generator().manual_seed(0)
    moved = dequantize_positions(batch.pos, batch.x[:, 1:4], batch.batch, batch, 4, generator=generator)
    geometry = pcfm.geometry.get(GEOMETRY)
    cells = torch.cat([small_showers[i].cell for i in range(4)])
    assert np.array_equal(geometry.locate(moved.numpy()), cells.numpy())
    assert float((moved - batch.pos).norm(dim=1).min()) > 0
    # the jitter fills the cell: radius spread close to the radial bin width 4.65 mm
    radius_shift = torch.hypot(moved[:, 0], moved[:, 1]) - torch.hypot(batch.pos[:, 0], batch.pos[:, 1])
    assert float(radius_shift.max() - radius_shift.min()) > 0.8 * 4.65
    # located sizes of the moved points are their own cells' sizes; far away there is no cell
    torch.testing.assert_close(located_cell_sizes(moved, batch.batch, batch, 4), batch.x[:, 1:4])
    far = moved + torch.tensor([0.0, 0.0, 1e4])
    assert torch.equal(located_cell_sizes(far, batch.batch, batch, 4), torch.zeros_like(far))


def test_dequantisation_of_voxels_stays_in_the_voxel():
    from pcfm.data.events import LArEvent

    geometry = pcfm.geometry.get("lartpc-768")
    voxels = np.array([[10, 20, 30], [400, 5, 700], [767, 767, 0]], dtype=np.float32)
    points = np.concatenate([voxels, np.ones((3, 5), np.float32)], 1)
    data = lartpc_to_data(LArEvent(points, np.array([[3, 0, 0, 0, 1]], np.float32)), geometry)
    batch = Batch.from_data_list([data])
    moved = dequantize_positions(batch.pos, batch.x[:, 1:4], batch.batch, batch, 1,
                                 generator=torch.Generator().manual_seed(0))
    assert np.array_equal(geometry.mm_to_voxel(moved.numpy()), voxels.astype(np.int64))
    assert float((moved - batch.pos).abs().min()) > 0


# ------------------------------------------------------------------ the points-per-event model
def test_points_model_reproduces_the_median_per_energy_bin():
    showers = simulate_showers(GEOMETRY, 600, energy=(1e3, 1e5), seed=3)
    dataset = ShowerDataset(showers)
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG)
    objective.on_data(dataset)
    sizes, energies = dataset.event_sizes(), showers.incident_energies
    generator = torch.Generator().manual_seed(0)
    edges = np.logspace(3, 5, 5)
    medians = []
    for low, high in zip(edges[:-1], edges[1:]):
        pick = (energies >= low) & (energies < high)
        drawn = objective.sample_n_points(np.repeat(energies[pick], 20), GEOMETRY, generator).numpy()
        assert drawn.min() >= 1
        assert np.median(drawn) == pytest.approx(np.median(sizes[pick]), rel=0.1)
        assert np.percentile(drawn, 90) - np.percentile(drawn, 10) == pytest.approx(
            np.percentile(sizes[pick], 90) - np.percentile(sizes[pick], 10), rel=0.35)
        medians.append(np.median(drawn))
    assert all(a < b for a, b in zip(medians, medians[1:]))  # more points at higher energy
    assert torch.equal(objective.sample_n_points([5e3] * 8, GEOMETRY, torch.Generator().manual_seed(7)),
                       objective.sample_n_points([5e3] * 8, GEOMETRY, torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="saw no training events of geometry 'par04-scipb'"):
        objective.sample_n_points([1e4], "par04-scipb")
    with pytest.raises(ValueError, match="must be positive and finite"):
        objective.sample_n_points([0.0], GEOMETRY)


def test_visible_energy_model_reproduces_the_response_and_its_tie_to_the_points():
    showers = simulate_showers(GEOMETRY, 600, energy=(1e3, 1e5), seed=3)
    dataset = ShowerDataset(showers)
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG)
    objective.on_data(dataset)
    assert objective.has_visible_energy_model(GEOMETRY) and not objective.has_visible_energy_model("par04-scipb")
    sizes, energies = dataset.event_sizes(), showers.incident_energies
    response = showers.showers.sum(1) / energies
    generator = torch.Generator().manual_seed(0)
    for low, high in zip(np.logspace(3, 5, 3)[:-1], np.logspace(3, 5, 3)[1:]):
        pick = (energies >= low) & (energies < high)
        many = np.repeat(energies[pick], 20)
        drawn = objective.sample_visible_energy(many, GEOMETRY, generator=generator).numpy() / many
        assert np.median(drawn) == pytest.approx(np.median(response[pick]), rel=0.01)
        assert np.std(drawn) == pytest.approx(np.std(response[pick]), rel=0.3)
    # given the numbers of points, the draws keep the data's rank correlation with them
    correlation = float(objective.points_energy_correlation[objective.geometry_vocabulary.index(GEOMETRY) + 1])

    def rank_correlation(a, b):
        return np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]

    pick = (energies > 1e4) & (energies < 2e4)  # one narrow bin: the energy dependence does not count
    expected = rank_correlation(sizes[pick], response[pick])
    assert correlation == pytest.approx(expected, abs=0.15)
    n = np.repeat(sizes[pick], 30)
    drawn = objective.sample_visible_energy(np.repeat(energies[pick], 30), GEOMETRY, n, generator).numpy()
    assert rank_correlation(n, drawn / np.repeat(energies[pick], 30)) == pytest.approx(expected, abs=0.15)
    with pytest.raises(ValueError, match="visible-energy model saw no training events of geometry 'par04-scipb'"):
        objective.sample_visible_energy([1e4], "par04-scipb")

    # strongly tied totals (synthetic): the fit finds the tie and conditional draws keep it
    rng = np.random.default_rng(1)
    incident = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 3000))
    score = rng.normal(size=3000)
    n_points = np.round(np.exp(np.log(incident) / 2 + 0.3 * score)).astype(int)
    visible = incident * np.exp(-0.05 + 0.04 * (0.7 * score + 0.71 * rng.normal(size=3000)))
    objective.fit_n_points(n_points, incident, [GEOMETRY] * 3000, visible_energy=visible)
    tag = objective.geometry_vocabulary.index(GEOMETRY) + 1
    assert float(objective.points_energy_correlation[tag]) == pytest.approx(0.7, abs=0.05)
    drawn = objective.sample_visible_energy(incident, GEOMETRY, n_points, generator).numpy()
    within = (incident > 1e4) & (incident < 2e4)
    assert rank_correlation(n_points[within], drawn[within] / incident[within]) == pytest.approx(
        rank_correlation(n_points[within], visible[within] / incident[within]), abs=0.12)
    independent = objective.sample_visible_energy(incident, GEOMETRY, generator=generator).numpy()
    assert abs(rank_correlation(n_points[within], independent[within] / incident[within])) < 0.15


def test_copula_correlation_of_known_gaussians():
    from pcfm.tasks.event_model import _copula_correlation
    rng = np.random.default_rng(0)
    a = rng.normal(size=4000)
    b = 0.6 * a + 0.8 * rng.normal(size=4000)
    groups = rng.integers(0, 4, 4000)
    assert _copula_correlation(np.exp(a), b ** 3, groups) == pytest.approx(0.6, abs=0.03)  # monotone maps: same
    assert _copula_correlation(a, rng.normal(size=4000), groups) == pytest.approx(0.0, abs=0.05)
    # a shared shift between groups (the energy dependence) is not a correlation within them
    assert _copula_correlation(rng.normal(size=4000) + 5 * groups, rng.normal(size=4000) + 5 * groups,
                               groups) == pytest.approx(0.0, abs=0.05)
    assert _copula_correlation(np.ones(10), np.arange(10.0), np.zeros(10)) == 0.0


def test_on_data_fits_once_and_adds_geometries(small_showers):
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG, energy_transform="power")
    objective.on_data(small_showers)
    energies = torch.cat([small_showers[i].energy for i in range(len(small_showers))]).double()
    positions = torch.cat([small_showers[i].pos for i in range(len(small_showers))]).double()
    assert float(objective.energy_transform.mean) == pytest.approx(float(energies.sqrt().mean()), rel=1e-9)
    torch.testing.assert_close(objective.position_scale, positions.square().mean(0).sqrt().float())
    fitted = objective.energy_transform.to_dict()
    other = ShowerDataset(simulate_showers("par04-scipb", 20, energy=(100.0, 300.0), seed=2))
    objective.on_data(other)
    assert objective.energy_transform.to_dict() == fitted  # the denoiser's units stay put
    assert objective.sample_n_points([200.0], "par04-scipb").item() >= 1
    assert objective.sample_n_points([200.0], GEOMETRY).item() >= 1


# ------------------------------------------------------------------ configuration
def test_config_round_trip_restores_the_objective(small_showers):
    objective = PointDiffusion(backbone_config=BACKBONE_CONFIG, energy_transform={"kind": "fraction", "log": True},
                               position_scale_mm=[20.0, 20.0, 50.0], dequantize=False)
    objective.on_data(small_showers)
    config = json.loads(json.dumps(objective.config()))
    assert config["energy_transform"]["kind"] == "fraction" and config["position_scale_mm"] == [20.0, 20.0, 50.0]
    rebuilt = get_objective_class("diffusion").from_config(config, BACKBONE_CONFIG)
    rebuilt.load_state_dict(objective.state_dict())
    assert rebuilt.config() == objective.config()
    assert torch.equal(rebuilt.n_points_quantiles, objective.n_points_quantiles)
    data = small_showers[0]
    incident = data.incident_energy.expand(data.num_nodes)
    torch.testing.assert_close(rebuilt.to_state(data.pos, data.energy, incident),
                               objective.to_state(data.pos, data.energy, incident), rtol=0, atol=0)
    with pytest.raises(ValueError, match="option"):
        PointDiffusion(backbone_config=BACKBONE_CONFIG, energy_transform={"kind": "log", "exponent": 2})
    with pytest.raises(ValueError, match="position_scale_mm must be positive"):
        PointDiffusion(backbone_config=BACKBONE_CONFIG, position_scale_mm=0.0)
