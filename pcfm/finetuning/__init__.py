"""Fine-tuning: downstream tasks and the Lightning module that trains a backbone on them.

- :mod:`pcfm.finetuning.task`: the :class:`DownstreamTask` interface and the registry
  :data:`TASKS` (a new task: one file, one line there);
- :mod:`pcfm.finetuning.classification`, :mod:`~pcfm.finetuning.regression`,
  :mod:`~pcfm.finetuning.segmentation`: the built-in tasks;
- :mod:`pcfm.finetuning.metrics`: accuracy and F1 of classes;
- :mod:`pcfm.finetuning.module`: :class:`FinetuneModule`, backbone + task.

:func:`pcfm.finetune` (in :mod:`pcfm.api.finetuning`) runs all of it on data.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pcfm.finetuning.task import TASKS, DownstreamTask, get_task_class, make_task
from pcfm.finetuning.module import MODES, FinetuneModule, backbone_state


def task_metrics(task: str, prediction: np.ndarray, truth: np.ndarray, targets: Sequence[str] = ("incident_energy",),
                 class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Held-out metrics of task ``task`` (its :meth:`~DownstreamTask.metrics`) with those options."""
    return make_task(task, targets=tuple(targets), class_names=class_names).metrics(prediction, truth)


__all__ = ["TASKS", "DownstreamTask", "get_task_class", "make_task", "MODES", "FinetuneModule", "backbone_state",
           "task_metrics"]
