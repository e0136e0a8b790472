"""A new kind of detector is one class (the Geometry interface) plus one line in
pcfm.geometry._KINDS: a kind defined here (planes of square pads) is built from its dictionary,
turned into point clouds, augmented, tokenised by the backbone and listed by the command line."""
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from pcfm import geometry as geometries
from pcfm.data.augment import augment_by_symmetry
from pcfm.geometry import Geometry, isotropic_frame
from pcfm.nn import Backbone, token_coverage


class PadPlanes(Geometry):
    """``n_planes`` planes of ``n_pads x n_pads`` square pads of ``pitch_mm``, ``gap_mm`` apart."""

    kind = "pad_planes"

    def __init__(self, name, n_planes, n_pads, pitch_mm, gap_mm, description=""):
        super().__init__(name, description)
        self.shape, self.pitch_mm, self.gap_mm = (n_pads, n_pads, n_planes), float(pitch_mm), float(gap_mm)

    @classmethod
    def from_dict(cls, spec):
        return cls(spec["name"], spec["n_planes"], spec["n_pads"], spec["pitch_mm"], spec["gap_mm"])

    @property
    def n_cells(self):
        return int(np.prod(self.shape))

    def _steps(self):
        return np.array([self.pitch_mm, self.pitch_mm, self.gap_mm])

    def centers(self, index=None):
        ijk = np.stack(np.unravel_index(self._check_index(index), self.shape), 1)
        return (ijk + 0.5) * self._steps()

    def sizes(self, index=None):
        return np.tile([self.pitch_mm, self.pitch_mm, 1.0], (len(self._check_index(index)), 1))

    def locate(self, positions):
        ijk = np.floor(np.asarray(positions) / self._steps()).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(self.shape)), axis=1)
        out = np.full(len(ijk), -1, dtype=np.int64)
        out[inside] = np.ravel_multi_index(tuple(ijk[inside].T), self.shape)
        return out

    @property
    def material_frame(self):
        return isotropic_frame((0.0, 0.0, 0.0), 140.0)  # argon-like: 14 cm per radiation length

    def to_dict(self):
        return {"kind": self.kind, "name": self.name, "n_planes": self.shape[2], "n_pads": self.shape[0],
                "pitch_mm": self.pitch_mm, "gap_mm": self.gap_mm}


@pytest.fixture
def pads(monkeypatch):
    monkeypatch.setitem(geometries.KINDS, "pad_planes", PadPlanes)  # the one registry line
    spec = {"kind": "pad_planes", "name": "test-pads", "n_planes": 8, "n_pads": 12, "pitch_mm": 5.0, "gap_mm": 20.0}
    geometry = geometries.from_dict(spec)
    monkeypatch.setitem(geometries._registered, geometry.name, geometry)
    return geometry


def events(geometry, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cells = rng.choice(geometry.n_cells, size=40 + 10 * i, replace=False)
        energy = rng.exponential(2.0, len(cells)) + 0.1
        out.append(Data(pos=torch.tensor(geometry.centers(cells), dtype=torch.float32),
                        x=torch.tensor(np.c_[np.log(energy), geometry.sizes(cells)], dtype=torch.float32),
                        geometry=geometry.name, incident_energy=torch.tensor([1000.0]),
                        theta=torch.tensor([float("nan")]), phi=torch.tensor([float("nan")])))
    return Batch.from_data_list(out)


def test_a_registered_kind_runs_through_the_data_path_and_the_backbone(pads):
    assert geometries.get("test-pads") is pads and pads.to_dict()["kind"] == "pad_planes"
    batch = events(pads)
    moved = augment_by_symmetry(batch, torch.Generator().manual_seed(0))
    assert torch.equal(moved.pos, batch.pos)  # no symmetry declared: the events stay as they are
    model = Backbone.from_preset("tiny", depth=1)
    assert token_coverage(model, batch) == 1.0
    out = model(batch)
    assert out.pooled.shape == (3, model.width) and torch.isfinite(out.point_features).all()
    assert pads.readout_threshold_mev == 0.0 and pads.extent_text() == ""


def test_a_kind_without_a_simulator_says_so(pads):
    from pcfm.engine.data import simulate_pretraining_events

    with pytest.raises(ValueError, match="no simulator for geometry 'test-pads' \\(kind 'pad_planes'\\): give data="):
        simulate_pretraining_events("test-pads", 4)


def test_a_kind_that_brings_its_simulator_pretrains_without_files(pads, monkeypatch):
    """The geometry chooses its simulator (Geometry.simulate_events): pcfm's data path asks it."""
    from pcfm.data import EventList
    from pcfm.engine.data import simulate_pretraining_events

    def simulate_events(self, n_events, rng, **options):
        batch = events(self, n_events, seed=int(rng.integers(1 << 30)))
        return EventList(batch.to_data_list())

    monkeypatch.setattr(PadPlanes, "simulate_events", simulate_events, raising=False)
    dataset = simulate_pretraining_events(["test-pads", "test-pads"], 2, seed=4)
    assert len(dataset) == 4 and dataset[0].num_nodes == 40 and dataset[3].num_nodes == 50
    assert not torch.equal(dataset[0].pos, dataset[2].pos)  # geometry g draws from seed + g
