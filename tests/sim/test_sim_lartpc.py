"""Physics and layout checks of the fast LArTPC simulator (pcfm.sim.lartpc)."""
import numpy as np
import pytest

from pcfm.sim.lartpc import (
    LAR_CRITICAL_ENERGY, LAR_MOLIERE_RADIUS_MM, LAR_RADIATION_LENGTH_MM, M_MU, M_P, MICHEL_MAX_ENERGY,
    PI_PLUS_DECAY_MUON_KE,
    LArTPCConfig, LArTPCSimulator, bethe_dedx, csda_range, photon_interaction_length,
    simulate_lartpc_event, simulate_lartpc_events,
)

PITCH = 3.0
CENTRE = np.array([1152.0, 1152.0, 1152.0])
ALONG_X = [1.0, 0.0, 0.0]


def gun(seed, pdg, energy, vertex=CENTRE, direction=None):
    return LArTPCSimulator(seed=seed).particle_gun(pdg, energy, vertex, direction, low_energy_blips=False)


def point_cluster(event):
    return np.repeat(np.arange(len(event.clusters)), event.cluster_sizes)


def group_points(event, primary, semantic=None):
    """Points of the group of the ``primary``-th primary (optionally one semantic class)."""
    group = event.meta["primaries"][primary, -1]
    rows = event.clusters[:, 2] == group
    if semantic is not None:
        rows &= event.clusters[:, 4] == semantic
    return event.points[np.isin(point_cluster(event), np.flatnonzero(rows))]


def mm(points):
    """Voxel centres in mm."""
    return (points[:, :3].astype(float) + 0.5) * PITCH


@pytest.fixture(scope="module")
def default_events():
    return simulate_lartpc_events(8, seed=11)


def test_events_follow_the_pilarnet_v2_layout(default_events):
    for event in default_events:
        event.validate()
        p, c, extra = event.points, event.clusters, event.cluster_extra
        assert p.dtype == np.float32 and p.shape[1] == 8
        assert c.shape[1] == 6 and extra.shape == (len(c), 5) and event.version == 2
        assert c[:, 0].sum() == len(p)
        xyz = p[:, :3]
        assert np.all(xyz == np.round(xyz)) and xyz.min() >= 0 and xyz.max() <= 767
        # one point per (cluster, voxel): deposits in the same voxel were merged
        labelled = np.column_stack([point_cluster(event), xyz])
        assert len(np.unique(labelled, axis=0)) == len(p)
        # the low-energy cluster comes first and only there
        assert list(c[0, 1:]) == [-1, -1, -1, 4, -1]
        assert np.all(c[1:, 4] != 4) and np.all(c[1:, 0] > 0)
        assert np.array_equal(c[1:, 1], np.arange(len(c) - 1))
        for column in (2, 3):  # group and interaction ids are 0..k-1
            ids = np.unique(c[1:, column])
            assert np.array_equal(ids, np.arange(len(ids)))
        assert np.all(p[:, 3] > 0) and np.all(p[:, 4] >= 0) and np.all(p[:, 7] > 0)
        # recombination: collected / produced electrons (W = 23.6 eV) is ~0.7 for a MIP and
        # drops to ~0.2 in Bragg peaks; never above 1
        ratio = p[:, 6] * 23.6e-6 / p[:, 3]
        assert np.all(ratio > 0.05) and np.all(ratio <= 1.0 + 1e-5)
        assert 0.6 < np.median(ratio) < 0.75
        assert np.all(extra[1:, 2:] > -2) and np.all(extra[1:, 2:] < 770)


def test_default_size_and_class_mix(default_events):
    sizes = np.array([len(e.points) for e in default_events])
    assert 1000 < np.median(sizes) < 20000
    semantic = np.bincount(np.concatenate([e.semantic for e in default_events]), minlength=5)
    share = semantic / semantic.sum()
    assert share[0] > 0.1 and share[1] > 0.1 and share[4] > 0.05  # showers, tracks, low energy


def test_semantic_classes_agree_with_particle_ids_and_masses(default_events):
    masses = {0: 0.0, 1: 0.511, 2: M_MU, 3: 139.57, 4: M_P}
    for event in default_events:
        semantic, pid = event.clusters[1:, 4], event.clusters[1:, 5]
        mass = event.cluster_extra[1:, 0]
        track = semantic == 1
        assert set(pid[track]) <= {2, 3, 4}
        assert np.allclose(mass[track], [masses[k] for k in pid[track]], rtol=1e-4)
        assert set(pid[semantic == 0]) <= {0, 1}
        assert set(pid[(semantic == 2) | (semantic == 3)]) <= {1}
        # shower fragments are started by the primary electron or by a photon
        assert np.all(np.isclose(mass[semantic != 1], 0.0) | np.isclose(mass[semantic != 1], 0.511, rtol=1e-3))


def test_seed_makes_runs_reproducible():
    a = simulate_lartpc_events(2, seed=5)
    b = simulate_lartpc_events(2, rng=np.random.default_rng(5))
    c = simulate_lartpc_events(2, seed=6)
    for x, y in zip(a, b):
        assert np.array_equal(x.points, y.points) and np.array_equal(x.clusters, y.clusters)
        assert np.array_equal(x.cluster_extra, y.cluster_extra)
    assert not np.array_equal(a[0].points[:, 3].sum(), c[0].points[:, 3].sum())


def test_muon_deposits_a_mip_per_centimetre():
    """Middle of a 400 MeV muon (beta*gamma ~ 2-3): about 2.1 MeV/cm, i.e. 0.63 MeV per voxel step."""
    muon_range = float(csda_range(400.0, M_MU))
    start, stop = 100 + 0.3 * muon_range, 100 + 0.6 * muon_range
    per_cm, charge_to_energy = [], []
    for seed in range(3):
        event = gun(seed, [-13], [400.0], [100.0, 1152, 1152], ALONG_X)
        track = group_points(event, 0, semantic=1)
        x = mm(track)[:, 0]
        middle = track[(x >= start) & (x < stop)]
        per_cm.append(middle[:, 3].sum() / (stop - start) * 10)
        charge_to_energy.append(middle[:, 4].sum() / middle[:, 3].sum())
    per_cm = np.array(per_cm)
    # energy_2, the energy seen through the charge, is calibrated on MIPs
    assert np.allclose(charge_to_energy, 1.0, atol=0.05), charge_to_energy
    assert np.all(np.abs(per_cm - 2.1) < 0.2 * 2.1), per_cm
    # the track carries the restricted loss (deltas above 3 MeV are their own clusters)
    restricted = 10 * bethe_dedx(250.0, M_MU, t_cut=3.0)
    assert abs(per_cm.mean() / restricted - 1) < 0.1


def test_proton_has_a_bragg_peak_at_its_range():
    energy = 200.0
    proton_range = float(csda_range(energy, M_P))
    event = gun(1, [2212], [energy], [100.0, 1152, 1152], ALONG_X)
    track = group_points(event, 0)
    assert set(event.clusters[1:, 5]) == {4} and set(event.clusters[1:, 4]) == {1}
    x = mm(track)[:, 0] - 100
    first = track[x < 0.3 * proton_range, 3].sum() / (0.3 * proton_range)
    last = track[x > 0.85 * proton_range, 3].sum() / (0.15 * proton_range)
    assert last > 2.5 * first
    assert abs(x.max() - proton_range) < 0.05 * proton_range
    # the charge (energy_2) under-counts the densely ionising Bragg peak: more recombination
    peak = track[x > 0.95 * proton_range]
    assert peak[:, 4].sum() < 0.85 * peak[:, 3].sum()


def test_muon_range_grows_with_energy_as_csda():
    reach, start = [], np.array([100.0, 1152, 1152])
    for energy in (60.0, 120.0, 240.0, 480.0):  # 0.1 to 2.1 m
        event = gun(2, [13], [energy], start, ALONG_X)
        track = group_points(event, 0, semantic=1)
        distance = np.linalg.norm(mm(track) - start, axis=1).max()
        expected = float(csda_range(energy, M_MU))
        assert 0.85 * expected < distance < 1.03 * expected + PITCH
        reach.append(distance)
    assert np.all(np.diff(reach) > 0)


def test_photons_convert_after_about_nine_sevenths_x0():
    n = 400
    event = gun(3, [22] * n, [1000.0] * n)
    group = event.clusters[point_cluster(event), 2]
    nearest = np.full(group.max() + 1, np.inf)
    np.minimum.at(nearest, group[group >= 0], np.linalg.norm(mm(event.points) - CENTRE, axis=1)[group >= 0])
    converted = event.meta["primaries"][:, -1] >= 0  # the rest (~0.3%) left the box unconverted
    assert converted.mean() > 0.97
    starts = nearest[event.meta["primaries"][converted, -1].astype(int)]
    mean_free_path = float(photon_interaction_length(1000.0))
    assert abs(mean_free_path / (9 / 7 * LAR_RADIATION_LENGTH_MM) - 1) < 0.15
    assert abs(starts.mean() / mean_free_path - 1) < 0.15
    assert 0.08 < np.mean(starts > 2 * mean_free_path) < 0.2  # exponential tail: e^-2
    assert np.mean(starts < 10) < 0.08  # a gap, not a shower starting at the vertex


def test_electron_shower_contains_its_energy_and_peaks_at_log_e_over_ec():
    energy = 1000.0
    profile = np.zeros(16)
    for seed in range(4):
        event = gun(seed, [11], [energy], [50.0, 1152, 1152], ALONG_X)
        deposited = event.points[:, 3].sum()
        assert 0.85 * energy < deposited <= energy * (1 + 1e-4)
        assert event.points[event.semantic == 0, 3].sum() > 0.8 * energy
        assert set(event.clusters[:, 4]) <= {0, 4} and set(event.clusters[1:, 5]) == {1}
        depth = (mm(event.points)[:, 0] - 50) / LAR_RADIATION_LENGTH_MM
        profile += np.histogram(depth, bins=16, range=(0, 16), weights=event.points[:, 3])[0]
    assert profile.sum() > 0.95 * 4 * energy
    expected_max = np.log(energy / LAR_CRITICAL_ENERGY) - 0.5  # Rossi, electrons
    assert abs(np.argmax(profile) + 0.5 - expected_max) <= 1.5
    lateral = np.linalg.norm(mm(event.points)[:, 1:] - 1152, axis=1)
    assert np.median(lateral) < LAR_MOLIERE_RADIUS_MM  # a core about a Moliere radius wide


def test_stopping_muons_decay_into_michel_electrons_after_they_stop():
    n = 20
    event = gun(4, [-13] * n, [150.0] * n)
    labels = point_cluster(event)
    c, extra = event.clusters, event.cluster_extra
    muon_range = float(csda_range(150.0, M_MU))
    michel_groups = np.unique(c[c[:, 4] == 2, 2])
    assert len(michel_groups) == n  # every mu+ decays
    for group in michel_groups:
        rows = np.flatnonzero((c[:, 2] == group) & (c[:, 4] == 2))
        vertex = extra[rows[0], 2:] * PITCH
        assert abs(np.linalg.norm(vertex - CENTRE) - muon_range) < 0.15 * muon_range
        michel = event.points[np.isin(labels, rows)]
        assert michel[:, 3].sum() <= MICHEL_MAX_ENERGY
        muon_rows = np.flatnonzero((c[:, 4] == 1) & (c[:, 5] == 2))
        muon = event.points[np.isin(labels, muon_rows)]
        near = np.linalg.norm(mm(muon) - vertex, axis=1) < 2 * PITCH
        assert near.any()  # the Michel starts where a muon track ends ...
        assert michel[:, 5].min() > muon[near, 5].max()  # ... after the muon got there
    # mu- are mostly captured by argon nuclei (about 76%)
    event = gun(5, [13] * 60, [150.0] * 60)
    decays = len(np.unique(event.clusters[event.clusters[:, 4] == 2, 2]))
    assert 4 <= decays <= 28


def test_stopping_pi_plus_gives_a_4_mev_muon():
    event = gun(6, [211] * 10, [60.0] * 10)
    muons = (event.clusters[:, 5] == 2) & (event.clusters[:, 4] == 1)
    momentum = np.sqrt(PI_PLUS_DECAY_MUON_KE**2 + 2 * PI_PLUS_DECAY_MUON_KE * M_MU)  # 29.8 MeV/c
    assert muons.sum() >= 5  # pions that did not interact in flight
    assert np.allclose(event.cluster_extra[muons, 1], momentum, rtol=1e-4)
    assert set(event.clusters[(event.clusters[:, 4] == 1) & (event.clusters[:, 5] != 2), 5]) <= {3, 4}


def test_delta_rays_leave_the_muon_track_above_threshold():
    event = gun(7, [-13], [1500.0], [100.0, 1152, 1152], ALONG_X)
    c, extra = event.clusters, event.cluster_extra
    deltas = np.flatnonzero(c[:, 4] == 3)
    groups = np.unique(c[deltas, 2])
    assert len(groups) >= 5  # ~2 per metre above 3 MeV, 2.2 m of track
    threshold_momentum = np.sqrt(3.0**2 + 2 * 3.0 * 0.511)
    first_of_group = [deltas[c[deltas, 2] == g][0] for g in groups]
    assert np.all(extra[first_of_group, 1] >= threshold_momentum * (1 - 1e-5))
    track = group_points(event, 0, semantic=1)
    for row in first_of_group:
        gap = np.linalg.norm(mm(track) - extra[row, 2:] * PITCH, axis=1).min()
        assert gap < 2 * PITCH


def test_target_points_sets_the_event_size():
    small = [len(e.points) for e in simulate_lartpc_events(4, seed=8, target_points=(3000, 5000))]
    large = [len(e.points) for e in simulate_lartpc_events(2, seed=8, target_points=(30000, 40000))]
    assert all(0.8 * 3000 < n < 1.15 * 5000 for n in small), small
    assert all(0.8 * 30000 < n < 1.15 * 40000 for n in large), large


def test_particles_per_event_sets_the_number_of_primaries():
    config = LArTPCConfig(cosmics_per_event=0.0)
    for n in (1, 4):
        event = simulate_lartpc_event(seed=9, particles_per_event=(n, n), config=config)
        assert len(event.meta["primaries"]) == n


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="target_points"):
        simulate_lartpc_event(seed=1, target_points=(500, 100))
    with pytest.raises(ValueError, match=r"target_points must be \(lo, hi\) with 0 < lo <= hi, both finite"):
        simulate_lartpc_events(1, seed=1, target_points=(100, np.inf))
    with pytest.raises(ValueError, match="n_events must be a non-negative integer, got -2"):
        simulate_lartpc_events(-2, seed=1)
    with pytest.raises(ValueError, match="either seed or rng"):
        simulate_lartpc_events(1, seed=1, rng=np.random.default_rng(1))
    with pytest.raises(ValueError, match="particles_per_event"):
        LArTPCConfig(particles_per_event=(3, 1))
    simulator = LArTPCSimulator(seed=1)
    with pytest.raises(ValueError, match=r"unsupported PDG codes \[2112\]"):
        simulator.particle_gun([2112], [100.0], CENTRE)
    with pytest.raises(ValueError, match="outside"):
        simulator.particle_gun([13], [100.0], [-1.0, 5.0, 5.0])


def test_events_round_trip_through_the_pilarnet_writer(tmp_path, default_events):
    from pcfm.data.pilarnet import read_pilarnet_event, write_pilarnet

    path = tmp_path / "sim.h5"
    assert write_pilarnet(path, default_events[:3]) == 3
    for i, event in enumerate(default_events[:3]):
        back = read_pilarnet_event(path, i)
        assert np.array_equal(back.points, event.points)
        assert np.array_equal(back.clusters, event.clusters)
        assert np.array_equal(back.cluster_extra, event.cluster_extra)
