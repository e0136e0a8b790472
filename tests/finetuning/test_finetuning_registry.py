"""A downstream task is one file plus one line in pcfm.finetuning.TASKS: a task defined here (the
log number of points of an event) trains, tests and reloads through pcfm.finetune unchanged."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import pcfm
from pcfm.finetuning import TASKS, DownstreamTask, FinetuneModule, get_task_class
from pcfm.finetuning.task import mlp_head


class PointCount(DownstreamTask):
    """log(number of points) of each event, from the pooled embedding."""

    name = "point_count"
    OPTIONS = ("scale",)

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def build(self, width, hidden):
        self.head = mlp_head(width, hidden, 1)

    def forward(self, output, batch):
        return self.head(output.pooled)[:, 0]

    def labels(self, batch):
        return torch.log(torch.bincount(batch.batch, minlength=int(batch.num_graphs)).float()) / self.scale

    def loss(self, outputs, labels):
        return nn.functional.mse_loss(outputs, labels)

    def predict(self, outputs, batch):
        return {"prediction": outputs * self.scale, "truth": self.labels(batch) * self.scale}

    def metrics(self, prediction, truth):
        return {"rmse": float(np.sqrt(np.mean((prediction - truth) ** 2)))}

    def fit_options(self, events):
        return {"scale": float(np.mean([math.log(event.num_nodes) for event in events]))}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TASKS, "point_count", "tests.finetuning.test_finetuning_registry:PointCount")


def test_a_registered_task_fine_tunes_tests_and_reloads(registered, tmp_path):
    result = pcfm.finetune("point_count", model={"preset": "tiny", "depth": 1}, n_events=40, max_steps=3,
                           batch_points=3000, workdir=tmp_path, accelerator="cpu", progress=False,
                           data_options={"energy_range": (1e3, 5e3)})
    assert set(result.metrics) == {"rmse", "n_train", "n_test"} and math.isfinite(result.metrics["rmse"])
    assert result.module.task.scale > 1.0  # fitted on the training events before training
    reloaded = FinetuneModule.load_from_checkpoint(result.checkpoint_path)
    assert isinstance(reloaded.task, PointCount) and reloaded.task.scale == result.module.task.scale


def test_an_unknown_task_names_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'pid'; choose from \['classification', 'regression', "
                                         r"'segmentation'\]"):
        pcfm.finetune("pid", workdir=tmp_path)
    assert get_task_class("segmentation").per_point and not get_task_class("classification").per_point
