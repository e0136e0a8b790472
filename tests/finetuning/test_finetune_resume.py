"""Fine-tuning runs that resume, refuse another run's workdir, stop early and test their best weights."""
import json
import re
import shutil

import lightning as L
import numpy as np
import pytest
import torch

from pcfm.api import pretrain
from pcfm.api import FinetuneDataModule, finetune
from pcfm.engine.training import PatientEarlyStopping, checkpoint_path
from pcfm.finetuning import FinetuneModule, task_metrics
from pcfm.tasks.pretrain import CheckpointError, read_checkpoint
from tests.interruption import InterruptAt, Interrupted

SHOWERS = dict(particles=("electron", "pion"), energy_range=(2e3, 2e4))
# 48 training events in batches of <= 3000 points; exactly reproducible on CPU (deterministic=True).
RUN = dict(n_events=80, batch_points=3000, lr=3e-3, val_fraction=0.25, progress=False, deterministic=True,
           log_every_n_steps=1, data_options=SHOWERS)


class CountSteps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps += 1


# Validation every 3 steps with a patience that does not run out: the best checkpoint and the
# early-stopping counters are part of what a resume must restore.
RESUMABLE = dict(RUN, max_steps=9, checkpoint_every_n_steps=3, val_every_n_steps=3, patience=5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finetune("classification", workdir=tmp_path_factory.mktemp("whole"), **RESUMABLE)


def state_close(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6) for key in a)


def test_an_interrupted_finetune_resumes_to_the_weights_and_metrics_of_an_uninterrupted_one(uninterrupted, tmp_path):
    with pytest.raises(Interrupted):
        finetune("classification", workdir=tmp_path, callbacks=[InterruptAt(7)], **RESUMABLE)
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not (tmp_path / "metrics.json").exists()
    counter = CountSteps()
    resumed = finetune("classification", workdir=tmp_path, callbacks=[counter], **RESUMABLE)
    assert counter.steps == 3
    assert resumed.training["resumed_from_step"] == 6 and uninterrupted.training["resumed_from_step"] is None
    assert resumed.training["steps"] == 9 and not resumed.training["stopped_early"]
    assert state_close(resumed.module.state_dict(), uninterrupted.module.state_dict())
    last = lambda result: read_checkpoint(result.checkpoint_path)["state_dict"]  # noqa: E731
    assert state_close(last(resumed), last(uninterrupted))
    assert resumed.metrics == pytest.approx(uninterrupted.metrics)
    assert resumed.training["tested_step"] == uninterrupted.training["tested_step"]
    losses = lambda result: [row["train/loss"] for row in result.history if "train/loss" in row]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert len(losses(resumed)) == 9


def test_rerunning_a_finished_finetune_tests_it_again_without_training(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted.checkpoint_path.parent, tmp_path / "checkpoints")
    counter = CountSteps()
    again = finetune("classification", workdir=tmp_path, callbacks=[counter], **RESUMABLE)
    assert counter.steps == 0
    assert again.training["resumed_from_step"] == 9 and again.training["steps"] == 9
    assert again.metrics == uninterrupted.metrics
    assert state_close(again.module.state_dict(), uninterrupted.module.state_dict())
    assert json.loads(again.metrics_path.read_text())["training"]["resumed_from_step"] == 9


def test_a_workdir_of_another_run_is_not_resumed(uninterrupted, tmp_path):
    source = pretrain(workdir=tmp_path / "pretrain", max_steps=1, n_events=12, val_fraction=0.0, batch_points=3000,
                      progress=False, data_options={"energy_range": (2e3, 2e4)})
    shutil.copytree(uninterrupted.checkpoint_path.parent, tmp_path / "run" / "checkpoints")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for change, message in [({"seed": 1}, "its seed is 0, not 1"),
                            ({"n_labels": 20}, "its n_labels is None, not 20"),
                            ({"task": "regression"}, "its task is 'classification', not 'regression'"),
                            ({"model": {"preset": "tiny", "depth": 1}}, "its backbone is"),
                            ({"checkpoint": source.checkpoint_path}, "its checkpoint_weights is None, not '"),
                            ({"patience": 2}, "its patience is 5, not 2"),
                            ({"n_events": 81}, "its n_events is 80, not 81")]:
        with pytest.raises(CheckpointError, match=re.escape(f"{last}: belongs to another fine-tuning run: {message}")):
            finetune(workdir=tmp_path / "run", **{"task": "classification", **RESUMABLE, **change})
    # The same starting checkpoint path holding other weights is another run too.
    settings = dict(RESUMABLE, max_steps=1, val_fraction=0.0, patience=None, checkpoint=source.checkpoint_path)
    finetune("classification", workdir=tmp_path / "from", **settings)
    pretrain(workdir=tmp_path / "pretrain", max_steps=2, n_events=12, val_fraction=0.0, batch_points=3000,
             progress=False, data_options={"energy_range": (2e3, 2e4)})
    with pytest.raises(CheckpointError, match="its checkpoint_weights is '[0-9a-f]+', not '[0-9a-f]+'"):
        finetune("classification", workdir=tmp_path / "from", **settings)
    # A pretraining run's folder holds no fine-tuning settings; resume=False starts afresh.
    with pytest.raises(CheckpointError, match=re.escape(f"{source.checkpoint_path}: holds no record of a fine-tuning")):
        finetune("classification", workdir=tmp_path / "pretrain", **RESUMABLE)
    fresh = finetune("classification", workdir=tmp_path / "run", resume=False, **{**RESUMABLE, "seed": 1})
    assert fresh.training["resumed_from_step"] is None and fresh.training["steps"] == 9
    assert read_checkpoint(last)["pcfm_finetune_run"]["settings"]["seed"] == 1


def test_a_fresh_start_deletes_the_checkpoints_and_metrics_of_the_run_before(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted.checkpoint_path.parent, tmp_path / "checkpoints")
    shutil.copy(uninterrupted.metrics_path, tmp_path / "metrics.json")
    # and what killed writers left beside them
    leftovers = [tmp_path / "checkpoints" / ".best.ckpt.abcd1234.tmp", tmp_path / ".metrics.json.abcd1234.tmp"]
    for path in leftovers:
        path.write_bytes(b"")
    # crashed before its first checkpoint: nothing of the old run is left to resume or to read
    with pytest.raises(Interrupted):
        finetune("classification", workdir=tmp_path, resume=False, callbacks=[InterruptAt(1)],
                 **{**RESUMABLE, "seed": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert not (tmp_path / "metrics.json").exists()


def test_a_corrupt_last_checkpoint_says_that_resume_false_starts_afresh(uninterrupted, tmp_path):
    last = checkpoint_path(tmp_path)
    last.parent.mkdir()
    content = uninterrupted.checkpoint_path.read_bytes()
    last.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{last}: not a readable checkpoint") + ".*"
                       + re.escape(f"; cannot resume from it: pass resume=False to start afresh in {tmp_path}")):
        finetune("classification", workdir=tmp_path, **RESUMABLE)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: is a folder, not a checkpoint file; give the "
                                                        f"checkpoint file inside it, e.g. {last}")):
        finetune("classification", workdir=tmp_path / "other", checkpoint=tmp_path, **RESUMABLE)


def test_patience_stops_early_and_the_best_validation_weights_are_tested(tmp_path):
    result = finetune("classification", workdir=tmp_path, max_steps=40, val_every_n_steps=2,
                      checkpoint_every_n_steps=5, patience=2, **RUN)
    training = result.training
    assert training["stopped_early"] and training["steps"] < 40
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert result.tested_checkpoint == best and training["tested_checkpoint"] == str(best)
    # Stopped after `patience` validations without improvement: the best came 2 validations
    # (4 steps) before the end, and validates lower than the final weights.
    assert training["tested_step"] == training["steps"] - 4
    assert training["val_loss"]["best"] < training["val_loss"]["last"]
    logged = [row["val/loss"] for row in result.history if "val/loss" in row]
    assert training["best_val_loss"] == pytest.approx(min(logged), rel=1e-5)
    assert np.argmin(logged) == len(logged) - 3
    # The metrics are those of best.ckpt's weights, not of the final ones.
    stored = read_checkpoint(best)
    assert stored["global_step"] == training["tested_step"]
    module = result.module.state_dict()
    assert all(torch.equal(value, module[key]) for key, value in stored["state_dict"].items())
    assert not state_close(read_checkpoint(result.checkpoint_path)["state_dict"], module)
    datamodule = FinetuneDataModule(task="classification", n_events=80, batch_points=3000, val_fraction=0.25,
                                    seed=0, **SHOWERS)
    datamodule.setup()
    reloaded = FinetuneModule.load_from_checkpoint(best).eval()
    with torch.no_grad():
        outputs = [reloaded.predict(batch) for batch in datamodule.test_dataloader()]
    prediction, truth = (torch.cat([out[key] for out in outputs]).numpy() for key in ("prediction", "truth"))
    expected = task_metrics("classification", prediction, truth)
    assert {key: result.metrics[key] for key in expected} == pytest.approx(expected)
    recorded = json.loads(result.metrics_path.read_text())["training"]
    assert recorded == json.loads(json.dumps(training))


def test_patience_needs_validation_events(tmp_path):
    with pytest.raises(ValueError, match="patience=3 stops on the validation loss, but there are no validation"):
        finetune("classification", workdir=tmp_path, max_steps=2, patience=3, **{**RUN, "val_fraction": 0.0})


def _trainer_at(step: int, val_loss: float):
    from types import SimpleNamespace

    return SimpleNamespace(callback_metrics={"val/loss": torch.tensor(val_loss)}, fast_dev_run=False,
                           strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
                           should_stop=False, current_epoch=0, global_step=step)


@pytest.mark.parametrize("min_steps, stopped_at", [(0, 6), (10, 12), (16, 18)])
def test_patient_early_stopping_waits_for_min_steps_but_keeps_the_best(min_steps, stopped_at):
    # validation every 2 steps on a plateau: the loss improves at step 2 and at step 14 only
    losses = {2: 0.69, 4: 0.70, 6: 0.70, 8: 0.70, 10: 0.70, 12: 0.70, 14: 0.20, 16: 0.30, 18: 0.30, 20: 0.30}
    stopping = PatientEarlyStopping(min_steps, monitor="val/loss", mode="min", patience=2)
    stopped = None
    for step, loss in losses.items():
        trainer = _trainer_at(step, loss)
        stopping._run_early_stopping_check(trainer)
        if trainer.should_stop:
            stopped = step
            break
    assert stopped == stopped_at
    # plain patience gives up on the plateau (step 6); with min_steps=10 the validations at 10
    # and 12 use up the patience; with 16 the run reaches the drop at 14, keeps it as the best,
    # and stops two validations after 16
    if min_steps == 16:
        assert float(stopping.best_score) == pytest.approx(0.20)
    nan_stop = PatientEarlyStopping(100, monitor="val/loss", mode="min", patience=2)
    trainer = _trainer_at(2, float("nan"))
    nan_stop._run_early_stopping_check(trainer)
    assert trainer.should_stop  # a non-finite loss stops at once, min_steps or not


def test_min_steps_keeps_a_patient_run_going_and_is_recorded(tmp_path):
    result = finetune("classification", workdir=tmp_path, max_steps=12, val_every_n_steps=2,
                      checkpoint_every_n_steps=4, patience=1, min_steps=10, **RUN)
    assert result.training["steps"] >= 10 and result.training["min_steps"] == 10
    with pytest.raises(ValueError, match="min_steps must be between 0 and max_steps=12"):
        finetune("classification", workdir=tmp_path / "bad", max_steps=12, patience=1, min_steps=13, **RUN)
