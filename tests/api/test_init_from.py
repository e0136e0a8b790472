"""pcfm.pretrain(init_from=...): a new run that starts from another run's weights (not a resume)."""
import lightning as L
import pytest
import torch

from pcfm.api import load_initial_weights, pretrain
from pcfm.cli.main import main
from pcfm.data import ShowerDataset
from pcfm.sim import simulate_showers
from pcfm.tasks.pretrain import CheckpointError, PretrainModule

MODEL = {"preset": "tiny", "depth": 1}
FAST = dict(batch_points=1500, val_fraction=0.0, progress=False, deterministic=True, log_every_n_steps=1)


def showers(geometry, seed):
    return ShowerDataset(simulate_showers(geometry, 12, energy=(200.0, 2000.0), seed=seed))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A diffusion run of 3 steps on ds2 showers: the weights the other runs start from."""
    return pretrain("diffusion", showers("calochallenge-ds2", 0), model=MODEL, max_steps=3,
                    workdir=tmp_path_factory.mktemp("source"), **FAST)


class StartingWeights(L.Callback):
    """The module's weights when training starts (after setup fitted the data statistics, before
    the first step): what a run of zero steps would return (max_steps must be >= 1)."""

    def on_train_start(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_new_run_starts_from_the_checkpoint_weights_with_a_fresh_schedule(source, tmp_path):
    """A new run starts from exactly the checkpoint's weights (data statistics aside), and its
    step count and learning-rate schedule start from 0."""
    target = showers("par04-scipb", 1)
    snapshot = StartingWeights()
    start = pretrain("diffusion", target, max_steps=1, workdir=tmp_path / "zero", init_from=source.checkpoint_path,
                     callbacks=[snapshot], **FAST)
    trained = PretrainModule.load_from_checkpoint(source.checkpoint_path).state_dict()
    copied = snapshot.state
    assert start.module.hparams["backbone"] == source.module.hparams["backbone"]  # model=None: the checkpoint's
    refitted = {f"objectives.diffusion.{name}" for name in ("n_points_quantiles", "n_points_events",
                                                             "visible_energy_quantiles", "visible_energy_events",
                                                             "points_energy_correlation")}
    assert all(torch.equal(copied[k], trained[k]) for k in trained if k not in refitted | {"data_statistics_fitted"})
    # the points-per-event model learnt the new geometry and kept the old one
    events = start.module.objectives["diffusion"].n_points_events.sum(1)
    vocabulary = list(start.module.backbone.config.geometry_vocabulary)
    for geometry in ("calochallenge-ds2", "par04-scipb"):
        assert events[vocabulary.index(geometry) + 1] > 0, geometry
    assert set(start.initialised_from["copied"]) == set(trained) - {"data_statistics_fitted"}
    assert start.initialised_from["not_in_model"] == [] and start.initialised_from["not_in_checkpoint"] == []

    adapted = pretrain("diffusion", target, max_steps=2, workdir=tmp_path / "adapt",
                       init_from=source.checkpoint_path, lr=2e-3, warmup_steps=1, **FAST)
    steps = [row["step"] for row in adapted.history if "train/loss" in row]
    assert steps == [0, 1]  # a new run, not a resume of the source's 3 steps
    lrs = [row["train/lr"] for row in adapted.history if "train/lr" in row]
    assert lrs[0] == pytest.approx(2e-3)  # the new schedule, not the source's decayed one
    assert torch.load(adapted.checkpoint_path, weights_only=False)["global_step"] == 2
    head = "objectives.diffusion.head.2.weight"
    assert not torch.equal(adapted.module.state_dict()[head].cpu(), trained[head])  # and it trains on

    # the same run from scratch starts elsewhere: the copy is what made the difference
    fresh = StartingWeights()
    scratch = pretrain("diffusion", target, model=MODEL, max_steps=1, workdir=tmp_path / "scratch",
                       callbacks=[fresh], **FAST)
    assert scratch.initialised_from is None
    assert not torch.equal(fresh.state[head], trained[head])


def test_shared_parts_are_copied_and_new_heads_start_fresh(source, tmp_path):
    """mpm + diffusion from a diffusion-only module: the backbone and diffusion head are copied,
    the mpm decoder is new."""
    module = PretrainModule(source.module.hparams["backbone"], objectives=["mpm", "diffusion"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    summary = load_initial_weights(module, source.module)
    assert summary["source"] == "<in-memory PretrainModule>"
    assert summary["not_in_checkpoint"] and all(k.startswith("objectives.mpm.") for k in summary["not_in_checkpoint"])
    assert any(k.startswith("backbone.") for k in summary["copied"])
    state, trained = module.state_dict(), source.module.state_dict()
    assert all(torch.equal(state[k], trained[k].cpu()) for k in summary["copied"])
    assert all(torch.equal(state[k], before[k]) for k in state if k not in summary["copied"])
    assert not torch.equal(state["objectives.diffusion.head.2.weight"], before["objectives.diffusion.head.2.weight"])


def test_shape_mismatches_name_the_checkpoint_and_the_parameter(source, tmp_path):
    wider = {**MODEL, "width": 32, "heads": 2}
    with pytest.raises(CheckpointError, match=r"last\.ckpt: cannot initialise from it: parameter '[^']+' has shape "
                                              r"\(\d+(, \d+)*\) there but \(\d+(, \d+)*\) in the model to train"):
        pretrain("diffusion", showers("par04-scipb", 1), model=wider, max_steps=1, workdir=tmp_path / "w",
                 init_from=source.checkpoint_path, **FAST)
    with pytest.raises(CheckpointError, match=r"energy transform .*'log'.* but the model to train uses .*'power'"):
        pretrain("diffusion", showers("par04-scipb", 1), max_steps=1, workdir=tmp_path / "p",
                 init_from=source.checkpoint_path,
                 objective_options={"diffusion": {"energy_transform": {"kind": "power"}}}, **FAST)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        pretrain("diffusion", showers("par04-scipb", 1), max_steps=1, workdir=tmp_path / "m",
                 init_from=tmp_path / "missing.ckpt", **FAST)
    assert not (tmp_path / "w" / "checkpoints" / "last.ckpt").exists()


def test_cli_init_from(source, tmp_path, capsys):
    workdir = tmp_path / "cli"
    code = main(["pretrain", "--init-from", str(source.checkpoint_path), "objective=diffusion", f"workdir={workdir}",
                 "max_steps=1", "n_events=8", "batch_points=1500", "val_fraction=0", "progress=false",
                 "data_options.energy_range=[200.0, 2000.0]"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"initialised from {source.checkpoint_path}" in out and "trained from scratch" in out
    assert (workdir / "checkpoints" / "last.ckpt").is_file()
    assert main(["pretrain", "--init-from", str(tmp_path / "none.ckpt"), f"workdir={tmp_path / 'x'}",
                 "max_steps=1"]) == 2
    assert "none.ckpt: no such checkpoint file" in capsys.readouterr().err
