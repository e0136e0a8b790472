"""Pretraining end to end (pcfm.pretrain, pcfm.tasks.pretrain, pcfm.engine): checkpoints,
resume, divergence, corrupt files, data from files and mixed detectors."""
import math
import re
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

import pcfm.data
import pcfm.sim
from pcfm.api import backbone_config, objective_weights, pretrain
from pcfm.engine.data import PretrainDataModule, ResumableBatchSampler
from pcfm.tasks import OBJECTIVES, Objective
from pcfm.tasks.mpm import MaskedPointModelling
from pcfm.tasks.pretrain import CheckpointError, PretrainModule, TrainingDivergedError, warmup_cosine
from tests.interruption import InterruptAt, Interrupted

# Small and exactly reproducible on CPU (deterministic=True makes the threaded scatter ops so).
FAST = dict(n_events=24, batch_points=2000, progress=False, deterministic=True, log_every_n_steps=1,
            model={"preset": "tiny", "depth": 2}, objective_options={"mpm": {"decoder_depth": 1}})


class EventEnergy(Objective):
    """A toy objective with data statistics: predict each event's mean log-energy, centred on the
    training set's mean (a buffer learnt by on_data) and counting its events (a config entry)."""

    name = "event_energy"

    def __init__(self, backbone_config, training_events=0):
        super().__init__()
        self.training_events = training_events
        self.head = torch.nn.Linear(backbone_config.width, 1)
        self.register_buffer("mean_log_energy", torch.tensor(0.0))

    def config(self):
        return {"training_events": self.training_events}

    def on_data(self, dataset):
        self.training_events = len(dataset)
        self.mean_log_energy.fill_(torch.cat([dataset[i].x[:, 0] for i in range(len(dataset))]).mean())

    def loss(self, backbone, batch):
        tokens = backbone.tokenize(batch)
        pooled = backbone.pool(tokens, backbone.encode(tokens))
        target = torch.zeros(batch.num_graphs).index_add(0, batch.batch, batch.x[:, 0])
        target = target / torch.bincount(batch.batch, minlength=batch.num_graphs) - self.mean_log_energy
        return {"loss": (self.head(pooled).squeeze(1) - target).square().mean()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return pretrain(workdir=workdir, max_steps=4, checkpoint_every_n_steps=2, val_fraction=0.25, **FAST)


def some_showers(n=3, seed=7):
    showers = pcfm.sim.simulate_showers("calochallenge-ds2", n, particle="photon", energy=(2e3, 2e4), seed=seed)
    dataset = pcfm.data.ShowerDataset(showers)
    return Batch.from_data_list([dataset[i] for i in range(n)])


def test_pretrain_returns_a_checkpoint_that_rebuilds_the_model(finished):
    assert finished.checkpoint_path == finished.workdir / "checkpoints" / "last.ckpt"
    loaded = PretrainModule.load_from_checkpoint(finished.checkpoint_path)
    assert loaded.hparams["backbone"] == backbone_config({"preset": "tiny", "depth": 2}).to_dict()
    assert loaded.hparams["objectives"]["mpm"]["decoder_depth"] == 1
    batch = some_showers()
    trained = finished.module.cpu().eval()
    with torch.no_grad():
        expected, got = trained.backbone(batch), loaded.eval().backbone(batch)
        assert torch.equal(expected.pooled, got.pooled) and torch.equal(expected.point_features, got.point_features)
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert torch.equal(trained.objectives["mpm"].loss(trained.backbone, batch, generator())["loss"],
                           loaded.objectives["mpm"].loss(loaded.backbone, batch, generator())["loss"])
    # Training changed the weights (the checkpoint is not of the initial model).
    L.seed_everything(0, verbose=False)
    fresh = PretrainModule(loaded.hparams["backbone"], objectives=loaded.hparams["objectives"])
    assert not torch.equal(fresh.backbone.tokenizer.embed[0].weight, loaded.backbone.tokenizer.embed[0].weight)


def test_pretrain_reports_final_metrics_and_the_logged_history(finished):
    assert [row["step"] for row in finished.history if "train/loss" in row] == [0, 1, 2, 3]
    for key in ("train/loss", "val/loss", "val/mpm/chamfer", "val/mpm/scale", "val/mpm/point_energy",
                "val/mpm/total_energy"):
        assert math.isfinite(finished.metrics[key]), key
    rows = [row for row in finished.history if "train/mpm/chamfer" in row]
    for row in rows:  # the logged total is the sum of the weighted terms
        terms = sum(row[f"train/mpm/{name}"] for name in ("chamfer", "scale", "point_energy", "total_energy"))
        assert row["train/loss"] == pytest.approx(terms, rel=1e-5)
    lrs = [row["train/lr"] for row in finished.history if "train/lr" in row]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]


def test_schedule_warms_up_linearly_then_decays_by_a_cosine():
    assert warmup_cosine(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # 8 training events in batches of <= 2000 points: 4 batches in the first epoch and 3 in the
    # second, so the interruption (last checkpoint at step 6) falls inside the second epoch.
    settings = dict(FAST, max_steps=9, checkpoint_every_n_steps=3, val_fraction=0.0, n_events=8)
    uninterrupted = pretrain(workdir=tmp_path / "a", **settings)
    with pytest.raises(Interrupted):
        pretrain(workdir=tmp_path / "b", callbacks=[InterruptAt(7)], **settings)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state == {"epoch": 1, "batches_done": 2}
    resumed = pretrain(workdir=tmp_path / "b", **settings)
    a, b = uninterrupted.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [row["step"] for row in resumed.history if "train/loss" in row] == list(range(9))
    losses = lambda result: [row["train/loss"] for row in result.history if "train/loss" in row]  # noqa: E731
    assert losses(resumed) == losses(uninterrupted)


def test_resuming_another_model_says_so(finished, tmp_path):
    shutil.copytree(finished.workdir / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: was written for another backbone configuration"):
        pretrain(workdir=tmp_path, max_steps=1, **{**FAST, "model": "tiny"})


def test_a_nan_loss_stops_training_naming_the_step_and_the_event(tmp_path):
    showers = pcfm.sim.simulate_showers("calochallenge-ds2", 6, particle="electron", energy=(2e3, 5e3), seed=2)
    dataset = pcfm.data.ShowerDataset(showers)
    events = [dataset[i] for i in range(6)]
    events[0].x[:, 0] = float("nan")
    sizes = np.array([event.num_nodes for event in events])
    order = [batch[0] for batch in ResumableBatchSampler(sizes, 10**6, max_events=1, seed=0)]
    step = order.index(0)  # one event per batch: event 0 comes at this step
    assert step > 0
    with pytest.raises(TrainingDivergedError) as error:
        pretrain(data=events, workdir=tmp_path, max_steps=6, val_fraction=0.0, data_options={"max_events": 1},
                 **{**FAST, "batch_points": 10**6})
    message = str(error.value)
    assert re.match(rf"training diverged at step {step}: objective 'mpm' term '\w+' is nan on ", message), message
    assert f"a batch of 1 events and {sizes[0]} points (dataset events [0])" in message
    assert "dataset events [0] have non-finite point positions or features" in message


def test_corrupt_truncated_and_foreign_checkpoints_name_the_file(finished, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    content = finished.checkpoint_path.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{truncated}: not a readable checkpoint")):
        PretrainModule.load_from_checkpoint(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape(f"{garbage}: not a readable checkpoint")):
        PretrainModule.load_from_checkpoint(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=re.escape(f"{foreign}: not a pcfm pretraining checkpoint: no pcfm")):
        PretrainModule.load_from_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint file"):
        PretrainModule.load_from_checkpoint(tmp_path / "missing.ckpt")
    # A folder is not "no such file"; a run's folder points to its checkpoint.
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: is a folder, not a checkpoint file") + "$"):
        PretrainModule.load_from_checkpoint(tmp_path)
    inside = re.escape(f"{finished.workdir}: is a folder, not a checkpoint file; give the checkpoint file inside "
                       f"it, e.g. {finished.checkpoint_path}")
    with pytest.raises(CheckpointError, match=inside):
        pretrain(workdir=tmp_path / "init", max_steps=1, init_from=finished.workdir, **FAST)
    # A corrupt last.ckpt in a run folder stops the resume with the same message, and says what to do.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(truncated, run / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=re.escape(f"{run / 'checkpoints' / 'last.ckpt'}: not a readable ")
                       + ".*" + re.escape(f"; cannot resume from it: pass resume=False to start afresh in {run} "
                                          f"(its checkpoints are deleted) or use another workdir")):
        pretrain(workdir=run, max_steps=1, **FAST)
    assert pretrain(workdir=run, max_steps=1, resume=False, **FAST).checkpoint_path.is_file()


def test_pretrain_on_calochallenge_files(tmp_path):
    for i, particle in enumerate(("electron", "pion")):
        showers = pcfm.sim.simulate_showers("calochallenge-ds2", 8, particle=particle, energy=(2e3, 2e4), seed=i)
        pcfm.data.write_calochallenge(tmp_path / f"ds2_{particle}.h5", showers)
    seen = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).extend(batch.event_id.tolist())

    result = pretrain(data=str(tmp_path / "ds2_*.h5"), workdir=tmp_path / "run", max_steps=4, val_fraction=0.25,
                      callbacks=[Record()], **FAST)
    assert math.isfinite(result.metrics["val/loss"])
    assert len(seen) >= 2, "the first epoch was not completed"
    # The first epoch saw each of the 12 training events (of 16, in two files) once.
    assert len(seen[0]) == len(set(seen[0])) == 12 and set(seen[0]) <= set(range(16))


def test_data_module_splits_disjointly_and_batches_showers_with_lartpc_events():
    datamodule = PretrainDataModule(geometry=["calochallenge-ds2", "lartpc-768"], n_events=10, val_fraction=0.2,
                                    batch_points=10**6, seed=1, lartpc_points=(300, 600))
    datamodule.setup()
    train, val = set(datamodule.train_dataset.indices), set(datamodule.val_dataset.indices)
    assert not train & val and train | val == set(range(20)) and len(val) == 4
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.num_graphs == 16
    assert set(batch.geometry) == {"calochallenge-ds2", "lartpc-768"}
    lartpc = torch.tensor([name == "lartpc-768" for name in batch.geometry])
    assert torch.isnan(batch.incident_energy[lartpc]).all() and (batch.incident_energy[~lartpc] > 0).all()
    torch.manual_seed(0)
    module = PretrainModule(backbone_config("tiny"), objectives={"mpm": {"decoder_depth": 1}})
    assert torch.isfinite(module.losses(batch)["mpm"]["loss"])
    # The same seed simulates the same events.
    again = PretrainDataModule(geometry=["calochallenge-ds2", "lartpc-768"], n_events=10, seed=1,
                               lartpc_points=(300, 600))
    again.setup()
    assert torch.equal(again.dataset[13].pos, datamodule.dataset[13].pos)


def test_objective_arguments():
    assert objective_weights("mpm+diffusion") == {"mpm": 1.0, "diffusion": 1.0}
    assert objective_weights({"mpm": 2}) == {"mpm": 2.0}
    assert isinstance(PretrainModule(backbone_config("tiny")).objectives["mpm"], MaskedPointModelling)
    with pytest.raises(ValueError, match=r"mask_ratio applies to the 'mpm' objective"):
        pretrain("diffusion", mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"weights given for objective\(s\) \['diffusion'\]"):
        PretrainModule(backbone_config("tiny"), objectives="mpm", weights={"diffusion": 1.0})


def test_two_objectives_share_the_backbone_and_data_statistics_are_checkpointed(tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "event_energy", f"{__name__}:EventEnergy")
    result = pretrain({"mpm": 1.0, "event_energy": 0.5}, workdir=tmp_path, max_steps=2, val_fraction=0.25, **FAST)
    datamodule = PretrainDataModule(n_events=24, val_fraction=0.25)
    datamodule.setup()
    train = datamodule.train_dataset
    expected_mean = torch.cat([train[i].x[:, 0] for i in range(len(train))]).mean()
    loaded = PretrainModule.load_from_checkpoint(result.checkpoint_path)
    for module in (result.module, loaded):
        objective = module.objectives["event_energy"]
        assert objective.training_events == len(train) == 18
        assert objective.mean_log_energy.item() == pytest.approx(expected_mean.item())
    assert bool(loaded.data_statistics_fitted)
    for row in result.history:
        if "train/loss" in row:
            assert row["train/loss"] == pytest.approx(row["train/mpm/loss"] + 0.5 * row["train/event_energy/loss"],
                                                      rel=1e-5)
