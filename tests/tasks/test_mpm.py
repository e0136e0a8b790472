"""Masked point modelling (pcfm.tasks.mpm) and the objective registry (pcfm.tasks.objective)."""
import pytest
import torch
from torch_geometric.data import Batch

import pcfm.data
import pcfm.sim
from pcfm.errors import PcfmError
from pcfm.nn import Backbone
from pcfm.tasks import OBJECTIVES, get_objective_class
from pcfm.tasks.mpm import MaskedPointModelling, chamfer_distance, draw_mask, hidden_group_targets


@pytest.fixture(scope="module")
def shower_batch():
    showers = pcfm.sim.simulate_showers("calochallenge-ds2", 6, particle="electron", energy=(2e3, 2e4), seed=3)
    dataset = pcfm.data.ShowerDataset(showers)
    return Batch.from_data_list([dataset[i] for i in range(6)])


@pytest.fixture(scope="module")
def lartpc_batch():
    events = pcfm.sim.simulate_lartpc_events(3, seed=1, target_points=(300, 600))
    return Batch.from_data_list([pcfm.data.lartpc_to_data(event) for event in events])


def tiny():
    torch.manual_seed(0)
    backbone = Backbone.from_preset("tiny", depth=2)
    return backbone, MaskedPointModelling(backbone.config, decoder_depth=1)


def test_mask_counts_per_event_follow_the_ratio_with_one_visible_and_one_hidden():
    sizes = torch.tensor([0, 1, 2, 5, 64])
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    batch = torch.repeat_interleave(torch.arange(5), sizes)
    for ratio, expected in ((0.6, [0, 0, 1, 3, 38]), (0.0, [0, 0, 1, 1, 1]), (1.0, [0, 0, 1, 4, 63])):
        hidden = draw_mask(ptr, ratio, torch.Generator().manual_seed(1))
        assert torch.bincount(batch[hidden], minlength=5).tolist() == expected


def test_mask_is_random_and_uniform_over_tokens():
    ptr = torch.tensor([0, 10, 30])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_mask(ptr, 0.5, generator) for _ in range(400)]).float()
    assert not torch.equal(draws[0], draws[1])
    # Each token is hidden half of the time (binomial sd 0.025 over 400 draws).
    assert torch.allclose(draws.mean(0), torch.full((30,), 0.5), atol=0.1)


def test_chamfer_distance_on_a_hand_made_example_with_padding_and_weights():
    prediction = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [50.0, 50.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [-9.0, 9.0]]])
    valid = torch.tensor([[True, True, False]])  # the third slot is padding on both sides
    # prediction -> target: 0 and 1, mean 0.5; target -> prediction: 0 and 4, mean 2.
    assert chamfer_distance(prediction, target, valid).item() == pytest.approx(2.5)
    weights = torch.tensor([[3.0, 1.0, 100.0]])
    assert chamfer_distance(prediction, target, valid, weights).item() == pytest.approx(0.5 + 4 * 0.25)
    assert chamfer_distance(prediction, target, torch.zeros_like(valid)).item() == 0.0


def test_targets_are_the_hidden_tokens_points_relative_to_their_position(shower_batch):
    backbone, objective = tiny()
    tokens = backbone.group(shower_batch)
    hidden = draw_mask(tokens.ptr, 0.6, torch.Generator().manual_seed(0))
    offset, log_energy, valid, log_scale = hidden_group_targets(tokens, hidden, 16)
    assert valid.shape[0] == hidden.sum()
    # Every point of every hidden token is a target, once.
    assert valid.sum() == int(hidden[tokens.group_token].sum())
    first = int(torch.nonzero(hidden)[0])
    serial = tokens.group_token == first
    members = tokens.group_point[serial]
    assert valid[0].sum() == len(members)
    relative = tokens.point_pos[serial] - tokens.pos[first]
    scale = relative.square().sum(1).mean().sqrt()
    torch.testing.assert_close(log_scale[0], scale.log())
    torch.testing.assert_close(offset[0, :len(members)], relative / scale)
    assert torch.equal(log_energy[0, :len(members)], shower_batch.x[members, 0])
    # Offsets are normalised: each group's mean squared offset is 1 (groups of 2+ distinct points).
    mean_square = (offset.square().sum(-1) * valid).sum(1) / valid.sum(1)
    several = valid.sum(1) >= 2
    torch.testing.assert_close(mean_square[several], torch.ones(int(several.sum())), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["shower_batch", "lartpc_batch"])
def test_loss_is_finite_on_showers_and_lartpc_events(name, request):
    batch = request.getfixturevalue(name)
    backbone, objective = tiny()
    terms = objective.loss(backbone, batch)
    assert set(terms) == {"loss", "chamfer", "scale", "point_energy", "total_energy", "hidden_fraction"}
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["loss"].item() == pytest.approx(
        sum(terms[key].item() for key in ("chamfer", "scale", "point_energy", "total_energy")), rel=1e-5)
    terms["loss"].backward()
    assert backbone.tokenizer.embed[0].weight.grad.abs().sum() > 0


def test_energy_weighted_chamfer_changes_only_the_chamfer_term(shower_batch):
    backbone, weighted = tiny()
    plain = MaskedPointModelling(backbone.config, decoder_depth=1, energy_weighted_chamfer=False)
    plain.load_state_dict(weighted.state_dict())
    a = plain.loss(backbone, shower_batch, generator=torch.Generator().manual_seed(2))
    b = weighted.loss(backbone, shower_batch, generator=torch.Generator().manual_seed(2))
    assert a["point_energy"].item() == pytest.approx(b["point_energy"].item())
    assert a["chamfer"].item() != pytest.approx(b["chamfer"].item())


def test_hidden_tokens_do_not_reach_the_encoder(shower_batch):
    """Changing the energies of the hidden tokens' points changes nothing predicted."""
    backbone, objective = tiny()
    backbone.eval()
    generator = torch.Generator().manual_seed(0)
    tokens, hidden = objective.masked_tokens(backbone, shower_batch, generator)
    hidden_points = tokens.group_point[hidden[tokens.group_token]]
    assert hidden_points.numel() > 50

    changed = shower_batch.clone()
    changed.x = changed.x.clone()
    changed.x[hidden_points, 0] += 3.0  # 20 times the energy; positions (so groups) unchanged
    changed_tokens, changed_hidden = objective.masked_tokens(backbone, changed, torch.Generator().manual_seed(0))
    assert torch.equal(changed_hidden, hidden) and torch.equal(changed_tokens.pos, tokens.pos)
    with torch.no_grad():
        before = objective.predict(backbone, tokens, hidden)
        after = objective.predict(backbone, changed_tokens, hidden)
        assert all(torch.equal(b, a) for b, a in zip(before, after))
        # Without the mask the encoder does see it: the test can fail.
        assert not torch.allclose(backbone.encode(backbone.tokenize(shower_batch)),
                                  backbone.encode(backbone.tokenize(changed)))


def test_loss_decreases_on_a_fixed_batch(shower_batch):
    backbone, objective = tiny()
    parameters = list(backbone.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    losses = []
    for _ in range(12):
        terms = objective.loss(backbone, shower_batch, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_registry_and_config_round_trip():
    assert OBJECTIVES["mpm"] == "pcfm.tasks.mpm:MaskedPointModelling"
    cls = get_objective_class("mpm")
    assert cls is MaskedPointModelling
    backbone = Backbone.from_preset("tiny")
    objective = MaskedPointModelling(backbone.config, mask_ratio=0.4, decoder_depth=1, energy_weighted_chamfer=False)
    rebuilt = cls.from_config(objective.config(), backbone.config)
    assert rebuilt.config() == objective.config()
    assert rebuilt.state_dict().keys() == objective.state_dict().keys()
    with pytest.raises(PcfmError, match=r"unknown objective 'mae'; choose from \['diffusion', 'mpm'\]"):
        get_objective_class("mae")
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MaskedPointModelling(backbone.config, mask_ratio=1.5)


def perturb(module, scale=0.05):
    """Add seeded noise to every parameter, so zero-initialised conditioning paths act."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("dropout, blind", [(1.0, True), (0.0, False)])
def test_condition_dropout_hides_the_incident_energy_while_training(shower_batch, dropout, blind):
    backbone, _ = tiny()
    perturb(backbone)  # AdaLN starts at zero: the conditioning matters only after training
    objective = MaskedPointModelling(backbone.config, decoder_depth=1, condition_dropout=dropout).train()
    scaled = shower_batch.clone()
    scaled.incident_energy = shower_batch.incident_energy * 7.0
    losses = [objective.loss(backbone, batch, torch.Generator().manual_seed(4))["loss"].item()
              for batch in (shower_batch, scaled)]
    assert (losses[0] == losses[1]) == blind
    assert torch.equal(shower_batch.incident_energy, scaled.incident_energy / 7.0)  # the batch is not modified


def test_condition_dropout_is_off_in_evaluation_and_validated(shower_batch):
    backbone, _ = tiny()
    perturb(backbone)
    objective = MaskedPointModelling(backbone.config, decoder_depth=1, condition_dropout=1.0).eval()
    scaled = shower_batch.clone()
    scaled.incident_energy = shower_batch.incident_energy * 7.0
    losses = [objective.loss(backbone, batch, torch.Generator().manual_seed(4))["loss"].item()
              for batch in (shower_batch, scaled)]
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="condition_dropout"):
        MaskedPointModelling(backbone.config, condition_dropout=1.5)
