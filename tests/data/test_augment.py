"""Augmentation by detector symmetries (pcfm.data.augment): events stay on their cell lattice."""
import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import pcfm.data
import pcfm.geometry as geometries
import pcfm.sim
from pcfm.data.augment import augment_by_symmetry, rotation_step
from pcfm.engine.data import pretraining_item


@pytest.fixture(scope="module")
def mixed():
    showers = pcfm.data.ShowerDataset(pcfm.sim.simulate_showers("calochallenge-ds2", 4, energy=(1e3, 2e4),
                                                                theta=(1.3, 1.8), seed=0))
    lartpc = [pcfm.data.lartpc_to_data(event) for event in
              pcfm.sim.simulate_lartpc_events(2, seed=3, target_points=(300, 500))]
    items = []
    for i in range(4):
        item = pretraining_item(showers[i], i)
        item.cell = showers[i].cell
        items.append(item)
    for event in lartpc:
        item = pretraining_item(event, 0)
        item.cell = torch.full((item.num_nodes,), -1)
        items.append(item)
    return Batch.from_data_list(items)


def test_calorimeter_events_rotate_by_whole_bins_and_keep_their_cells(mixed):
    moved = augment_by_symmetry(mixed, torch.Generator().manual_seed(0))
    geometry = geometries.get("calochallenge-ds2")
    showers = mixed.batch < 4
    cells = geometry.locate(moved.pos[showers].numpy())
    assert (cells >= 0).all()
    torch.testing.assert_close(torch.from_numpy(geometry.centers(cells)).float(), moved.pos[showers], atol=1e-3,
                               rtol=0)
    assert torch.equal(moved.cell[showers], torch.from_numpy(cells))
    # radius and depth are what a rotation or reflection keeps; energies and labels are shared
    radius = lambda pos: torch.hypot(pos[:, 0], pos[:, 1])  # noqa: E731
    torch.testing.assert_close(radius(moved.pos[showers]), radius(mixed.pos[showers]), atol=1e-3, rtol=0)
    assert torch.equal(moved.pos[showers, 2], mixed.pos[showers, 2]) and moved.x is mixed.x
    assert not torch.allclose(moved.pos[showers], mixed.pos[showers])
    # phi turns with the shower: an oblique shower at phi = 0 drifts along +-x (the sign of
    # cos theta); after the move its drift keeps that angle to the new phi
    def drift_angle(pos, points):
        weights = mixed.energy[points]
        drift = (pos[points, :2] * weights[:, None]).sum(0) / weights.sum()
        return math.atan2(drift[1], drift[0]), float(drift.norm())

    checked = 0
    for event in range(4):
        points = mixed.batch == event
        before, size = drift_angle(mixed.pos, points)
        after, _ = drift_angle(moved.pos, points)
        if size > 2.0:  # clearly oblique
            wrap = lambda angle: (angle + math.pi) % (2 * math.pi) - math.pi  # noqa: E731
            # exact up to float32: after = +-before + rotation, phi = +-0 + rotation
            assert min(abs(wrap(after - float(moved.phi[event]) - sign * before)) for sign in (1, -1)) < 1e-3
            checked += 1
    assert checked >= 1
    assert torch.equal(mixed.phi[:4], torch.zeros(4))  # the input is untouched
    assert rotation_step(geometry) == pytest.approx(2 * math.pi / 16)
    assert rotation_step(geometries.get("calochallenge-ds1-photons")) is None  # a layer of one angular bin


def test_lartpc_events_reflect_and_swap_axes_on_the_voxel_lattice(mixed):
    geometry = geometries.get("lartpc-768")
    events = mixed.batch >= 4
    seen = set()
    for seed in range(6):
        moved = augment_by_symmetry(mixed, torch.Generator().manual_seed(seed))
        voxels = (moved.pos[events].double() - torch.from_numpy(geometry.origin_mm)) / geometry.pitch_mm - 0.5
        assert torch.allclose(voxels, voxels.round(), atol=1e-3) and (voxels >= 0).all() and (voxels < 768).all()
        # distances between points are kept: a symmetry, not a deformation
        a, b = mixed.pos[events][:50].double(), moved.pos[events][:50].double()
        torch.testing.assert_close(torch.cdist(b, b), torch.cdist(a, a), atol=1e-3, rtol=0)
        seen.add(tuple(np.round(moved.pos[events][0].numpy(), 1)))
        assert torch.isnan(moved.phi[4:]).all()
    assert len(seen) > 3  # several different symmetries were drawn
