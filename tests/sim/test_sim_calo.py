"""Physics and API tests of the parameterised calorimeter shower simulator (pcfm.sim.calo)."""
import numpy as np
import pytest

import pcfm.geometry as geometry
from pcfm.errors import GeometryError
from pcfm.geometry.cylindrical import CylindricalGeometry
from pcfm.sim.calo import ShowerSimulator, SimulatorConfig, azimuthal_cdf, disk_share, simulate_showers

DS2 = "calochallenge-ds2"
CALORIMETER_PRESETS = ["calochallenge-ds1-photons", "calochallenge-ds1-pions", "calochallenge-ds2",
                       "calochallenge-ds3", "par04-scipb"]


def _mean_depth_x0(showers, geo):
    """Energy-weighted depth of each shower in radiation lengths, from its layer energies."""
    layer_energy = np.stack([part.sum(axis=(1, 2)) for part in geo.split_layers(showers.showers)], axis=1)
    x0 = geo.layer_x0()
    return layer_energy @ (0.5 * (x0[1:] + x0[:-1])) / layer_energy.sum(axis=1)


def _wide_geometry(absorber="W", sensor="Si", absorber_mm=1.4, sensor_mm=0.3, n_layers=60, name="wide-test"):
    """A deep calorimeter with radial edges at multiples of its Moliere radius, out to 30 R_M."""
    probe = geometry.from_dict({"name": "probe", "layers": [{"absorber": absorber, "absorber_mm": absorber_mm,
                                "sensor": sensor, "sensor_mm": sensor_mm, "r_edges_mm": [0, 1]}]})
    moliere = probe.layers[0].structure.moliere_radius_mm
    edges = [0.0] + [moliere * f for f in (0.25, 0.5, 0.75, 1.0, 2.0, 3.5, 10.0, 30.0)]
    return CylindricalGeometry.from_dict({
        "name": name, "layers": [{"repeat": n_layers, "absorber": absorber, "absorber_mm": absorber_mm,
                                  "sensor": sensor, "sensor_mm": sensor_mm, "sublayers": 2, "n_alpha": 1,
                                  "r_edges_mm": edges}]}), moliere


# -- closed-form transverse integrals --------------------------------------------------------
def test_disk_share_matches_centred_cdf_and_sampling():
    radius = np.array([0.5, 1.0, 3.0, 10.0])
    np.testing.assert_allclose(disk_share(radius, 0.0, 2.0), radius**2 / (radius**2 + 4.0), rtol=1e-12)
    rng = np.random.default_rng(0)
    u = rng.random(400_000)
    rho, phi = 2.0 * np.sqrt(u / (1 - u)), rng.uniform(0, 2 * np.pi, u.size)
    r = np.hypot(5.0 + rho * np.cos(phi), rho * np.sin(phi))  # profile centred 5 mm off axis
    for edge in (2.0, 5.0, 8.0, 20.0):
        assert disk_share(edge, 5.0, 2.0) == pytest.approx(np.mean(r < edge), abs=3e-3)


def test_azimuthal_cdf_is_a_cdf_peaked_towards_the_centre():
    alpha = np.linspace(-np.pi, np.pi, 17)
    np.testing.assert_allclose(azimuthal_cdf(alpha, 0.0), (alpha + np.pi) / (2 * np.pi), atol=1e-12)
    for e in (0.5, -0.5, 0.99):
        cdf = azimuthal_cdf(alpha, e)
        assert cdf[0] == pytest.approx(0.0, abs=1e-12) and cdf[-1] == pytest.approx(1.0, abs=1e-12)
        shares = np.diff(cdf)
        assert np.all(shares > 0)
        np.testing.assert_allclose(shares, shares[::-1], atol=1e-12)  # mirror symmetric in y
        towards_plus_x = shares[4:12].sum()  # the bins with |alpha| < pi/2
        assert (towards_plus_x > 0.5) == (e > 0)
    # numeric integral of (1 - e cos a)^-2 for one bin
    grid = np.linspace(0.3, 1.1, 20001)
    density = (1 - 0.6 * np.cos(grid)) ** -2 * (1 - 0.6**2) ** 1.5 / (2 * np.pi)
    numeric = np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid))
    assert azimuthal_cdf(1.1, 0.6) - azimuthal_cdf(0.3, 0.6) == pytest.approx(numeric, rel=1e-6)


def test_mean_energy_is_conserved_in_a_large_calorimeter():
    geo, _ = _wide_geometry()
    sim = ShowerSimulator(geo)
    energy = np.array([2e3, 5e4, 4e5])
    for theta in (np.pi / 2, 1.2):
        mean = sim.mean_energies(11, energy, np.full(3, theta), np.random.default_rng(0))[0]
        np.testing.assert_allclose(mean.sum(axis=1), energy, rtol=0.012)


# -- electromagnetic physics -------------------------------------------------------------------
def test_shower_depth_grows_by_one_radiation_length_per_unit_log_energy():
    geo = geometry.get(DS2)
    energies = np.array([1e3, 1e4, 1e5])
    depth = [_mean_depth_x0(simulate_showers(geo, 500, energy=e, seed=1), geo).mean() for e in energies]
    slope = np.polyfit(np.log(energies), depth, 1)[0]
    assert 0.7 < slope < 1.3, depth
    assert 4.0 < depth[0] < 8.0  # a 1 GeV electron peaks a few X0 deep in SiW


def test_ninety_percent_within_one_moliere_radius():
    for absorber, sensor, a_mm, s_mm in (("W", "Si", 1.4, 0.3), ("Pb", "Scintillator", 2.25, 5.0)):
        geo, _ = _wide_geometry(absorber, sensor, a_mm, s_mm, n_layers=45)
        showers = simulate_showers(geo, 300, energy=2e4, seed=2, threshold=False).showers
        radial = showers.reshape(300, geo.n_layers, -1).sum(axis=(0, 1))
        inside = radial[:4].sum() / radial.sum()  # the first four bins end at R_M
        assert 0.85 < inside < 0.95, (absorber, inside)
        assert radial[:5].sum() / radial.sum() > 0.95  # and about 95% within 2 R_M


def test_sampling_resolution_scales_as_inverse_sqrt_energy():
    energies = np.array([2e3, 8e3, 32e3, 128e3])
    sim = ShowerSimulator(DS2)
    relative = []
    for e in energies:
        total = sim.simulate(400, energy=e, seed=3).showers.sum(axis=1, dtype=np.float64)
        relative.append(total.std() / total.mean())
    exponent, log_a = np.polyfit(np.log(energies / 1e3), np.log(relative), 1)
    assert -0.6 < exponent < -0.4, relative
    assert 0.05 < np.exp(log_a) < 0.25  # stochastic term of SiW, per sqrt(GeV)


def test_calibrated_response_and_photons_start_deeper():
    geo = geometry.get(DS2)
    sim = ShowerSimulator(geo)
    electrons = sim.simulate(1000, particle="electron", energy=2e4, seed=4)
    photons = sim.simulate(1000, particle="photon", energy=2e4, seed=5)
    for showers in (electrons, photons):
        assert 0.95 < showers.showers.sum(axis=1).mean() / 2e4 < 1.01  # contained, ~1% lateral leakage
    shift = _mean_depth_x0(photons, geo).mean() - _mean_depth_x0(electrons, geo).mean()
    assert shift == pytest.approx(9 / 7, abs=0.35)


def test_visible_response_scales_by_the_sampling_fraction():
    spec = geometry.get("par04-scipb").to_dict()
    spec.update(name="par04-visible", energy_response="visible")
    visible = CylindricalGeometry.from_dict(spec)
    calibrated = simulate_showers("par04-scipb", 300, energy=1e4, seed=6).showers.sum(axis=1).mean()
    seen = simulate_showers(visible, 300, energy=1e4, seed=6).showers.sum(axis=1).mean()
    structure = visible.layers[0].structure
    e_hat = ShowerSimulator(visible).physics.e_hat[0]
    assert seen / calibrated == pytest.approx(e_hat * structure.mip_sampling_fraction, rel=0.03)


# -- pions ---------------------------------------------------------------------------------------
def test_pions_shower_deeper_wider_and_fluctuate_more_than_electrons():
    geo = geometry.get("calochallenge-ds1-pions")
    z, r = geo.cylindrical()[:, 2], geo.cylindrical()[:, 0]
    sim = ShowerSimulator(geo)
    stats = {}
    for particle in ("electron", "pion"):
        showers = sim.simulate(400, particle=particle, energy=2e4, seed=7).showers.astype(np.float64)
        total = showers.sum(axis=1)
        assert np.all(total > 0)
        stats[particle] = ((showers @ z / total).mean(), (showers @ r / total).mean(), total.std() / total.mean(),
                           total.mean() / 2e4)
    (z_e, r_e, sd_e, resp_e), (z_pi, r_pi, sd_pi, resp_pi) = stats["electron"], stats["pion"]
    assert z_pi > z_e + 200.0  # mm: the hadronic calorimeter sits behind the EM one
    assert r_pi > 1.5 * r_e
    assert sd_pi > 2.5 * sd_e
    assert 0.6 < resp_pi < 0.95 and resp_e > 0.95  # e/h > 1: pions read low


def test_pions_punch_through_a_thin_calorimeter():
    # dataset 2 is 1.3 interaction lengths deep: most of a pion's energy leaves
    response = simulate_showers(DS2, 300, particle="pion", energy=5e4, seed=8).showers.sum(axis=1) / 5e4
    assert response.mean() < 0.6
    assert np.mean(response < 0.05) > 0.1  # no interaction: a MIP only


# -- geometry of the incidence -------------------------------------------------------------------
def test_oblique_incidence_shifts_the_centroid_in_x():
    geo = geometry.get(DS2)
    centres = geo.centers()
    sim = ShowerSimulator(geo)
    centroid = {}
    for theta in (1.2, np.pi / 2, np.pi - 1.2):
        showers = sim.simulate(300, energy=5e4, theta=theta, seed=9).showers.astype(np.float64)
        centroid[theta] = (showers @ centres[:, :2]).sum(axis=0) / showers.sum()
    assert centroid[1.2][0] > 5.0 and centroid[np.pi - 1.2][0] < -5.0
    assert centroid[1.2][0] == pytest.approx(-centroid[np.pi - 1.2][0], rel=0.1)
    assert abs(centroid[np.pi / 2][0]) < 0.5
    assert all(abs(c[1]) < 0.5 for c in centroid.values())


# -- API -------------------------------------------------------------------------------------------
def test_seeds_reproduce_exactly():
    kwargs = dict(particle=[11, 22, 211, -211, -11, 22], energy=(1e3, 1e5), theta=(1.0, 2.0))
    a = simulate_showers(DS2, 6, seed=11, **kwargs)
    b = simulate_showers(DS2, 6, seed=11, **kwargs)
    c = simulate_showers(DS2, 6, rng=np.random.default_rng(11), **kwargs)
    d = simulate_showers(DS2, 6, seed=12, **kwargs)
    for field in ("showers", "incident_energies", "theta", "particle"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_array_equal(getattr(a, field), getattr(c, field))
    assert not np.array_equal(a.showers, d.showers)


def test_energies_finite_non_negative_and_thresholded():
    geo = geometry.get(DS2)
    sim = ShowerSimulator(geo)
    showers = sim.simulate(400, seed=13).showers
    assert showers.dtype == np.float32 and np.all(np.isfinite(showers)) and showers.min() >= 0
    live = showers[showers > 0]
    assert live.min() >= geo.readout_threshold_mev
    raw = sim.simulate(400, seed=13, threshold=False).showers
    assert np.any((raw > 0) & (raw < geo.readout_threshold_mev))
    np.testing.assert_array_equal(np.where(raw < geo.readout_threshold_mev, 0, raw), showers)


@pytest.mark.parametrize("name", CALORIMETER_PRESETS)
def test_every_preset_geometry(name):
    geo = geometry.get(name)
    n = 12
    particles = np.array([11, 22, 211] * 4)
    fixed = simulate_showers(name, n, particle=particles, energy=3e4, theta=1.3, seed=14)
    ranged = simulate_showers(name, n, particle="pion", energy=(1e3, 1e5), theta=(1.0, 2.1), seed=15)
    for result in (fixed, ranged):
        assert result.showers.shape == (n, geo.n_cells) and result.geometry == name
        assert np.all(np.isfinite(result.showers)) and result.showers.min() >= 0
        np.testing.assert_array_equal(result.phi, 0.0)
    np.testing.assert_array_equal(fixed.incident_energies, 3e4)
    np.testing.assert_array_equal(fixed.particle, particles)
    assert np.all((ranged.incident_energies >= 1e3) & (ranged.incident_energies <= 1e5))
    assert np.all((ranged.theta >= 1.0) & (ranged.theta <= 2.1))
    electrons = fixed.showers[fixed.particle == 11].sum(axis=1)
    assert np.all(electrons > 0.5 * 3e4)  # every preset stops most of a 30 GeV electron


def test_per_shower_energy_array_and_chunking_agree_in_shape():
    energies = np.geomspace(1e3, 1e6, 7)
    small_chunks = ShowerSimulator(DS2, SimulatorConfig(chunk_size=2)).simulate(7, energy=energies, seed=16)
    np.testing.assert_array_equal(small_chunks.incident_energies, energies)
    totals = small_chunks.showers.sum(axis=1) / energies
    assert np.all((totals > 0.8) & (totals < 1.1))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown particle 'muon'"):
        simulate_showers(DS2, 2, particle="muon")
    with pytest.raises(ValueError, match="unsupported PDG code 13"):
        simulate_showers(DS2, 2, particle=[11, 13])
    with pytest.raises(ValueError, match="positive and finite.*shower 1 has -5.0"):
        simulate_showers(DS2, 2, energy=[1e3, -5.0])
    with pytest.raises(ValueError, match="0 < low <= high"):
        simulate_showers(DS2, 2, energy=(0.0, 1e3))
    with pytest.raises(ValueError, match=r"theta must lie in \(0, pi\)"):
        simulate_showers(DS2, 2, theta=0.0)
    with pytest.raises(ValueError, match="either seed or rng"):
        simulate_showers(DS2, 2, seed=1, rng=np.random.default_rng(1))
    with pytest.raises(ValueError, match="non-negative integer"):
        simulate_showers(DS2, -1)
    with pytest.raises(GeometryError, match="'lartpc-768' is a voxel_grid geometry"):
        simulate_showers("lartpc-768", 2)
    assert len(simulate_showers(DS2, 0)) == 0


@pytest.mark.parametrize("energy", [-5.0, 0.0, np.nan, np.inf, 2e7, (1e3, np.inf), (1e3, 1e8), (0.0, 1e4)])
def test_energies_outside_what_the_readers_accept_are_argument_errors(energy):
    """Energies the CaloChallenge readers would refuse (above 1e7 MeV) are refused here, naming the argument."""
    from pcfm.errors import ArgumentError

    with pytest.raises(ArgumentError, match="^energy: "):
        simulate_showers(DS2, 2, energy=energy)
