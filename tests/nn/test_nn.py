"""The backbone (pcfm.nn): ragged batches, symmetries, isolation of events, conditioning, training."""
import json
import math

import pytest
import torch
from torch_geometric.data import Batch

import pcfm.data
import pcfm.sim
import pcfm.geometry
from pcfm.nn import (BACKBONE_PRESETS, Backbone, BackboneConfig, condition_features, preset_parameter_counts,
                     token_coverage)
from pcfm.nn.blocks import AdaptiveLayerNorm
from pcfm.nn.encoding import FourierFeatures, geometry_indices
from pcfm.nn.serialization import group_levels, serial_order

POINT_FIELDS = ("pos", "x", "energy", "cell", "semantic", "particle_id")


def showers(geometry, n, seed, energy=(1e3, 2e4)):
    data = pcfm.data.ShowerDataset(pcfm.sim.simulate_showers(geometry, n, energy=energy, seed=seed))
    return [data[i] for i in range(n)]


def take_points(data, index):
    """``data`` with only (or reordered to) the points ``index``."""
    data = data.clone()
    for name in POINT_FIELDS:
        if name in data:
            data[name] = data[name][index]
    return data


def jittered(data, seed):
    """``data`` with positions moved by up to 0.01 mm, so that no two neighbours are equally far.

    On a regular cell grid kNN ties are everywhere, and a backend may break them differently
    depending on which events share its work block; distinct distances make the neighbours unique.
    """
    data = data.clone()
    generator = torch.Generator().manual_seed(seed)
    data.pos = data.pos + (torch.rand(data.pos.shape, generator=generator) - 0.5) * 0.02
    return data


def event_slice(output, event):
    start, end = output.token_ptr[event], output.token_ptr[event + 1]
    return output.token_features[start:end]


@pytest.fixture(scope="module")
def ds2():
    return showers("calochallenge-ds2", 32, seed=1)


@pytest.fixture(scope="module")
def scipb():
    return showers("par04-scipb", 4, seed=2)


@pytest.fixture(scope="module")
def lartpc():
    events = pcfm.sim.simulate_lartpc_events(2, seed=3, target_points=(400, 800))
    return [pcfm.data.lartpc_to_data(event) for event in events]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Backbone.from_preset("tiny").eval()


def run(model, data_list, **kwargs):
    with torch.no_grad():
        return model(Batch.from_data_list(data_list), **kwargs)


def randomise_modulation(model, seed=1):
    """Give every AdaLN a non-zero conditioning map, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, AdaptiveLayerNorm):
            linear = module.modulation[1]
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.2)


def test_shapes_on_ragged_batch_with_one_point_and_empty_events(model, ds2):
    events = [ds2[0], take_points(ds2[1], [5]), ds2[2], take_points(ds2[3], []), take_points(ds2[4], [0, 1])]
    batch = Batch.from_data_list(events)
    output = run(model, events)
    config = model.config
    sizes = [event.num_nodes for event in events]
    assert sizes[1] == 1 and sizes[3] == 0
    # Groups of about 4 points, then of about 4 groups: ceil(ceil(n / 4) / 4) tokens per event.
    token_counts = [math.ceil(math.ceil(n / 4) / 4) for n in sizes]
    assert (output.token_ptr.diff() == torch.tensor(token_counts)).all()
    assert output.token_features.shape == (sum(token_counts), config.width)
    assert output.point_features.shape == (batch.num_nodes, config.width)
    assert output.pooled.shape == (5, config.width)
    for tensor in (output.token_features, output.point_features, output.pooled):
        assert torch.isfinite(tensor).all()
    tokens = output.tokens
    # Every point is in exactly one token of its own event, no token holds more than group_size.
    assert sorted(tokens.group_point.tolist()) == list(range(batch.num_nodes))
    assert (batch.batch[tokens.group_point] == tokens.batch[tokens.group_token]).all()
    members = torch.bincount(tokens.group_token, minlength=len(tokens.pos))
    assert members.min() >= 1 and members.max() <= config.group_size == 16
    # A token sits at the mean frame position of its points; the 1-point event's at its point.
    one = int(output.token_ptr[1])
    assert tokens.group_point[tokens.group_token == one].tolist() == [int(batch.ptr[1])]
    torch.testing.assert_close(tokens.pos[one], tokens.point_pos[tokens.group_token == one][0])
    assert token_coverage(model, batch) == 1.0


def test_groups_are_compact_and_nested():
    """Serial groups: near-equal sizes per level, each level inside one parent, and compact in space."""
    coordinates = torch.rand(1000, 3) * torch.tensor([4.0, 4.0, 30.0])
    batch = torch.zeros(1000, dtype=torch.long)
    levels = group_levels(torch.zeros(1000, dtype=torch.long), 1, (4, 4))
    assert [level.batch.numel() for level in levels] == [1000, 250, 63]
    sizes = torch.bincount(levels[1].parent)
    assert sizes.min() >= 3 and sizes.max() <= 4
    order = serial_order(coordinates, batch, 1)
    assert sorted(order.tolist()) == list(range(1000))
    # Consecutive points on the curve are far closer than random pairs.
    step = (coordinates[order][1:] - coordinates[order][:-1]).norm(dim=1).median()
    random_pair = (coordinates[1:] - coordinates[:-1]).norm(dim=1).median()
    assert step < 0.25 * random_pair


def test_material_frame_makes_siw_and_scipb_meshes_alike():
    """ds2 (SiW) and par04-scipb (Pb/scintillator) cells differ 3-4x in mm but not in X0 and R_M."""
    import pcfm.geometry as geometries
    from pcfm.nn import detector_coordinates

    ds2, scipb = geometries.get("calochallenge-ds2"), geometries.get("par04-scipb")
    cells = torch.arange(ds2.n_cells)
    positions = {name: torch.from_numpy(g.centers(cells.numpy())).float() for name, g in
                 (("ds2", ds2), ("scipb", scipb))}
    assert positions["scipb"][:, 2].max() > 3 * positions["ds2"][:, 2].max()
    batch = torch.zeros(ds2.n_cells, dtype=torch.long)
    units = {name: detector_coordinates(positions[name], batch, [geometry])[0]
             for name, geometry in (("ds2", "calochallenge-ds2"), ("scipb", "par04-scipb"))}
    torch.testing.assert_close(units["scipb"], units["ds2"], rtol=0.03, atol=0.02)  # layers: 0.78 vs 0.80 X0
    # Depth in X0 from the front face: 45 layers of about 0.8 X0; the first cell centre at 0.4 X0.
    assert units["ds2"][:, 2].min() == pytest.approx(0.40, abs=0.01)
    assert units["ds2"][:, 2].max() == pytest.approx(44.5 * 0.805, rel=0.02)
    # A LArTPC voxel at the centre of the volume is at the origin; a wall 8.2 X0 (1152 mm) away.
    lartpc = geometries.get("lartpc-768").material_frame
    centre = lartpc.to_units(torch.tensor([[1152.0, 1152.0, 0.0]]))
    torch.testing.assert_close(centre, torch.tensor([[0.0, 0.0, -1152.0 / 140.0]]))


def test_a_shower_one_radiation_length_deeper_is_seen(model, ds2):
    """The frame is absolute in depth: a shower moved 1 X0 deeper (or off the axis) changes the output."""
    event = ds2[20]
    x0_mm = pcfm.geometry.get("calochallenge-ds2").layers[0].structure.x0_mm
    reference = run(model, [event])
    for shift in ([0.0, 0.0, x0_mm], [pcfm.geometry.get("calochallenge-ds2").layers[0].structure.moliere_radius_mm,
                                       0.0, 0.0]):
        moved = event.clone()
        moved.pos = moved.pos + torch.tensor(shift)
        output = run(model, [moved])
        change = (output.pooled - reference.pooled).norm() / reference.pooled.norm()
        assert change > 0.02, (shift, change)
        assert (output.point_features - reference.point_features).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["showers", "lartpc"])
def test_point_order_does_not_matter(model, ds2, lartpc, kind):
    events = ds2[5:7] if kind == "showers" else lartpc
    generator = torch.Generator().manual_seed(0)
    perms = [torch.randperm(event.num_nodes, generator=generator) for event in events]
    reference = run(model, events)
    permuted = run(model, [take_points(event, perm) for event, perm in zip(events, perms)])
    offsets = Batch.from_data_list(events).ptr[:-1]
    global_perm = torch.cat([perm + offset for perm, offset in zip(perms, offsets)])
    torch.testing.assert_close(permuted.token_features, reference.token_features)
    torch.testing.assert_close(permuted.point_features, reference.point_features[global_perm])
    torch.testing.assert_close(permuted.pooled, reference.pooled)


def test_events_do_not_leak_into_each_other(model, ds2):
    a, b, b_other, c = (jittered(ds2[i], i) for i in (7, 8, 10, 9))
    before = run(model, [a, b, c])
    after = run(model, [a, b_other, c])
    assert not torch.allclose(before.pooled[1], after.pooled[1])
    for event in (0, 2):
        torch.testing.assert_close(event_slice(after, event), event_slice(before, event))
        torch.testing.assert_close(after.pooled[event], before.pooled[event])
    torch.testing.assert_close(after.point_features[:a.num_nodes], before.point_features[:a.num_nodes])
    torch.testing.assert_close(after.point_features[-c.num_nodes:], before.point_features[-c.num_nodes:])


def test_a_shifted_lartpc_event_keeps_its_groups(model, lartpc):
    """LArTPC physics is translation invariant: a shifted event is cut into the same groups (its
    absolute position in the volume is one more input, so the features may change)."""
    shift = torch.tensor([35.0 * 256, -12.0 * 256, 7.0 * 256]) * 140.0 / 256  # whole curve-grid steps
    moved = [event.clone() for event in lartpc]
    for event in moved:
        event.pos = event.pos + shift
    reference, shifted = (model.group(Batch.from_data_list(events)) for events in (lartpc, moved))
    assert torch.equal(reference.group_point, shifted.group_point)
    assert torch.equal(reference.group_token, shifted.group_token)
    torch.testing.assert_close(shifted.pos - reference.pos, (shift / 140.0).expand_as(reference.pos))


def test_one_model_runs_on_several_geometries(model, ds2, scipb, lartpc):
    ds2, scipb = ([jittered(event, i) for i, event in enumerate(ds2[:2])],
                  [jittered(event, 10 + i) for i, event in enumerate(scipb[:2])])
    alone = {name: run(model, events) for name, events in
             (("ds2", ds2[:2]), ("scipb", scipb[:2]), ("lartpc", lartpc))}
    for output in alone.values():
        assert torch.isfinite(output.point_features).all() and torch.isfinite(output.pooled).all()
    # Different geometries share a batch, and each event comes out as when batched alone.
    mixed = run(model, ds2[:2] + scipb[:2])
    torch.testing.assert_close(mixed.pooled, torch.cat([alone["ds2"].pooled, alone["scipb"].pooled]))
    # In material units a par04-scipb shower spans about the depth of a ds2 one (in mm, 4x).
    extent = lambda output: (output.token_pos.max(0).values - output.token_pos.min(0).values)[2]  # noqa: E731
    assert 0.4 < extent(alone["scipb"]) / extent(alone["ds2"]) < 2.5


def test_condition_features_from_data(ds2, lartpc):
    batch = Batch.from_data_list(ds2[:2])
    batch.incident_energy = torch.tensor([10_000.0, math.nan])
    batch.theta = torch.tensor([math.nan, math.pi / 3])
    features = condition_features(batch, 2, torch.device("cpu"))
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0],
                             [0.0, 0.0, 0.5, math.sqrt(3) / 2, 1.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(features, expected)
    # LArTPC events carry no energy or angles: all zeros, all flagged unknown.
    assert torch.equal(condition_features(Batch.from_data_list(lartpc), 2, torch.device("cpu")), torch.zeros(2, 8))
    vocabulary = ("calochallenge-ds2", "par04-scipb")
    tags = geometry_indices(["par04-scipb", "", "my-detector"], vocabulary, 3, torch.device("cpu"))
    assert tags.tolist() == [2, 0, 0]


def test_conditioning_is_off_at_init_and_acts_once_learned(ds2):
    torch.manual_seed(0)
    model = Backbone.from_preset("tiny").eval()
    base = Batch.from_data_list(ds2[:2])
    other = base.clone()
    other.incident_energy = base.incident_energy * 50
    other.theta = torch.full_like(base.theta, math.nan)
    with torch.no_grad():
        assert torch.equal(model(base).pooled, model(other).pooled)  # zero-initialised AdaLN
        randomise_modulation(model)
        changed = (model(base).pooled - model(other).pooled).abs().amax(1)
        assert (changed > 1e-3).all()
        # A NaN angle is the same as no angle at all.
        del other.theta
        with_nan = other.clone()
        with_nan.theta = torch.full((2,), math.nan)
        torch.testing.assert_close(model(other).pooled, model(with_nan).pooled)


def test_masked_encoding_sees_only_the_kept_tokens(model, ds2):
    batch = Batch.from_data_list(ds2[13:16])
    with torch.no_grad():
        tokens = model.tokenize(batch)
        keep = torch.rand(len(tokens.pos), generator=torch.Generator().manual_seed(0)) > 0.6
        visible = model.encode(tokens, keep)
        assert visible.shape == (int(keep.sum()), model.width)
        # Changing what the hidden tokens hold leaves the visible ones' features as they were.
        tampered = tokens.select(torch.ones_like(keep))
        tampered.features = torch.where(keep[:, None], tokens.features, torch.randn_like(tokens.features))
        torch.testing.assert_close(model.encode(tampered, keep), visible)
        assert not torch.allclose(model.encode(tampered)[keep], model.encode(tokens)[keep])
    # select() keeps the kept tokens' positions and events, and no hierarchy to decode.
    kept = tokens.select(keep)
    assert torch.equal(kept.pos, tokens.pos[keep]) and kept.skips is None
    assert torch.equal(kept.ptr.diff(), torch.bincount(tokens.batch[keep], minlength=3))


def test_embedding_only_visible_tokens_hides_the_others_points(model, ds2):
    """With ``visible``, what the hidden tokens' points hold reaches no visible token."""
    batch = Batch.from_data_list(ds2[13:16])
    with torch.no_grad():
        grouped = model.group(batch)
        visible = torch.rand(len(grouped.pos), generator=torch.Generator().manual_seed(0)) > 0.6
        hidden_points = grouped.group_point[~visible[grouped.group_token]]
        changed = batch.clone()
        changed.x = changed.x.clone()
        changed.x[hidden_points, 0] += 3.0
        a = model.embed(model.group(batch), batch, visible=visible).features[visible]
        b = model.embed(model.group(changed), changed, visible=visible).features[visible]
        torch.testing.assert_close(a, b)
        # Embedding every token, the change does reach visible ones (the test can fail).
        full_a, full_b = model.tokenize(batch).features[visible], model.tokenize(changed).features[visible]
        assert not torch.allclose(full_a, full_b)


def test_gradients_reach_every_parameter(ds2):
    torch.manual_seed(0)
    model = Backbone.from_preset("tiny")
    randomise_modulation(model)  # at init the condition encoder gets no gradient through zero maps
    output = model(Batch.from_data_list(ds2[:3]))
    loss = output.pooled.square().mean() + output.point_features.square().mean() + output.token_features.mean()
    loss.backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_runs_close_to_float32(model, ds2):
    batch = Batch.from_data_list(ds2[:2])
    with torch.no_grad():
        reference = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(batch)
    assert torch.isfinite(half.pooled).all()
    error = (half.pooled.float() - reference.pooled).norm() / reference.pooled.norm()
    assert error < 0.05


def test_preset_parameter_counts():
    counts = preset_parameter_counts()
    assert 0.3e6 <= counts["tiny"] <= 0.6e6
    assert 5e6 <= counts["small"] <= 12e6
    assert 20e6 <= counts["base"] <= 40e6


def test_config_round_trips_through_a_dict(model, ds2):
    config = BACKBONE_PRESETS["small"]
    assert BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    rebuilt = Backbone(BackboneConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(run(rebuilt.eval(), ds2[:2]).pooled, run(model, ds2[:2]).pooled)
    with pytest.raises(ValueError, match=r"unknown BackboneConfig field\(s\): \['widht'\]"):
        BackboneConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="pcfm 0.1 backbone"):
        BackboneConfig.from_dict({**BACKBONE_PRESETS["tiny"].to_dict(), "num_tokens": 64})
    with pytest.raises(ValueError, match="group sizes >= 2"):
        BackboneConfig(stages=(1, 4))
    with pytest.raises(ValueError, match="unknown backbone preset 'huge'"):
        Backbone.from_preset("huge")


def test_fourier_features_resolve_voxels_and_whole_detectors():
    features = FourierFeatures(12)
    assert features.out_dim == 3 * 2 * 12
    wavelengths = 2 * math.pi / features.angular_frequency
    torch.testing.assert_close(wavelengths[[0, -1]], torch.tensor([0.02, 200.0]))
    # Points a LArTPC voxel apart (0.02 X0) and a calorimeter depth apart (40 X0) both differ clearly.
    origin = features(torch.zeros(1, 3))
    for step in (0.01, 40.0):
        assert (features(torch.tensor([[step, 0.0, 0.0]])) - origin).abs().max() > 0.3


def test_a_few_steps_fit_the_incident_energy(ds2):
    torch.manual_seed(0)
    model = Backbone.from_preset("tiny", depth=2)
    head = torch.nn.Linear(model.width, 1)
    batch = Batch.from_data_list(ds2)
    condition_free = batch.clone()
    del condition_free.incident_energy  # the energy must come from the points
    target = torch.log10(batch.incident_energy)
    target = (target - target.mean()) / target.std()  # variance 1
    optimiser = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-4)
    losses = []
    for _ in range(35):
        tokens = model.tokenize(condition_free)
        prediction = head(model.pool(tokens, model.encode(tokens))).squeeze(1)
        loss = (prediction - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.25  # far better than predicting the mean (loss 1)


def test_hide_condition_copies_the_batch_and_marks_the_fields_unknown():
    from torch_geometric.data import Batch, Data

    from pcfm.nn import condition_features, hide_condition

    events = [Data(pos=torch.zeros(2, 3), incident_energy=torch.tensor([1e3 * (i + 1)]), theta=torch.tensor([0.1]))
              for i in range(3)]
    batch = Batch.from_data_list(events)
    hidden = hide_condition(batch, ("incident_energy",), torch.tensor([True, False, True]))
    assert torch.isnan(hidden.incident_energy).tolist() == [True, False, True]
    assert torch.equal(batch.incident_energy, torch.tensor([1e3, 2e3, 3e3]))  # the original is untouched
    assert hidden.pos is batch.pos and hidden.num_graphs == 3
    features = condition_features(hidden, 3, torch.device("cpu"))
    assert features[:, 1].tolist() == [0.0, 1.0, 0.0] and features[:, 4].tolist() == [1.0, 1.0, 1.0]
    everything = hide_condition(batch)
    assert condition_features(everything, 3, torch.device("cpu"))[:, [1, 4, 7]].abs().sum() == 0
    with pytest.raises(ValueError, match="cannot hide"):
        hide_condition(batch, ("energy",))
