"""The interface of a downstream task, and the registry of tasks by name.

A task owns everything that differs between, say, particle identification and energy
regression: which label it reads and which events can give one, what it fits on the training
events before training (class weights, target standardisation), its head on the backbone's
output, its loss, its predictions in physical units and its metrics.
:class:`~pcfm.finetuning.module.FinetuneModule` (training) and
:class:`~pcfm.api.finetuning.FinetuneDataModule` (data) ask the task and never switch on its
name, so a new task is one file with a :class:`DownstreamTask` subclass plus one line in
:data:`TASKS`.

The task's options (``targets``, ``class_names``, the fitted statistics) are stored in the
fine-tune checkpoint's hyper-parameters, and its head's weights under ``task.`` in the state dict.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
from torch import Tensor, nn

from pcfm.errors import DataError

#: Task name -> "module:Class", imported on first use.
TASKS: dict[str, str] = {
    "classification": "pcfm.finetuning.classification:Classification",
    "regression": "pcfm.finetuning.regression:Regression",
    "segmentation": "pcfm.finetuning.segmentation:Segmentation",
}


#: How an event-level head normalises the pooled embedding first (:func:`mlp_head`).
HEAD_NORMS = ("layer", "batch")


class BatchStandardize(nn.BatchNorm1d):
    """Each channel standardised over the events of the batch, without a learned scale or shift;
    running estimates in evaluation and for a training batch of a single event.

    Why: a from-scratch fine-tune with Adam first removes whatever in the head's input varies
    without the label, and the cheapest way is to shrink the backbone's variation across events:
    on Geant4 gamma / pi0 at lr 1e-3 - 3e-3 the pooled embedding became nearly the same for
    every shower within ten steps and training sat at ln 2 for hundreds of steps, for ever from
    some starts (benchmarks/RESULTS.md). Standardised per channel across events, that variation
    cannot be shrunk away (the same normalisation MAE puts under its linear probes).
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:  # no spread to measure in one event
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


def mlp_head(in_features: int, hidden: int, out_features: int, norm: str = "layer") -> nn.Sequential:
    """The head of the event-level tasks: a normalisation (``norm``: "layer", LayerNorm over the
    channels of each event; "batch", :class:`BatchStandardize` over the events), one hidden GELU
    layer, a linear read-out."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"unknown head norm {norm!r}; choose from {list(HEAD_NORMS)}")
    first = nn.LayerNorm(in_features) if norm == "layer" else BatchStandardize(in_features)
    return nn.Sequential(first, nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))


class DownstreamTask(nn.Module):
    """A downstream task: labels, head, loss, predictions, metrics (module docstring).

    Subclasses set the class attributes and implement :meth:`build`, :meth:`forward`,
    :meth:`labels`, :meth:`loss`, :meth:`predict` and :meth:`metrics`; the data hooks
    (:meth:`check_label`, :meth:`subset`, :meth:`fit_options`) have defaults.

    Attributes:
        name: the key in :data:`TASKS`.
        label_field: the ``Data`` field holding the label (None: the label is an event field
            every event has, such as the incident energy).
        per_point: the head reads per-point features (the backbone's up path runs).
        default_geometry: what :func:`pcfm.finetune` simulates when given neither data nor geometry.
        OPTIONS: constructor keywords stored in the checkpoint (all JSON-ready).
        head_norm: the normalisation an event-level head built by :func:`mlp_head` starts with
            (set by :class:`~pcfm.finetuning.FinetuneModule` before :meth:`build`).
    """

    name: ClassVar[str]
    label_field: ClassVar[Optional[str]] = None
    per_point: ClassVar[bool] = False
    default_geometry: ClassVar[str] = "calochallenge-ds2"
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    head_norm: str = "layer"

    # ------------------------------------------------------------------ the model side
    def build(self, width: int, hidden: int) -> None:
        """Create the head for a backbone of ``width`` channels (``hidden``: its hidden width)."""
        raise NotImplementedError

    def hidden_conditions(self) -> tuple[str, ...]:
        """Condition fields the backbone must not see (a regression's own targets)."""
        return ()

    def forward(self, output, batch) -> Tensor:
        """Outputs of the head on the backbone's :class:`~pcfm.nn.BackboneOutput` of ``batch``."""
        raise NotImplementedError

    def labels(self, batch) -> Tensor:
        """The training targets of a batch, in the units of the outputs."""
        raise NotImplementedError

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, outputs: Tensor, batch) -> dict[str, Tensor]:
        """``{"prediction", "truth"}`` in physical units (classes; MeV and radians)."""
        raise NotImplementedError

    def metrics(self, prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Held-out metrics from :meth:`predict` outputs, as a flat dict of floats."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the data side
    def check_label(self, item, index: int) -> Optional[int]:
        """Whether event ``item`` (dataset index ``index``) has a usable label: its class
        (>= 0), -1 for an event to leave out, or 0 when the task has no classes. Raises a
        :class:`~pcfm.errors.DataError` naming the event when its label is malformed.
        Default: the ``label_field`` must be present."""
        if self.label_field is not None and getattr(item, self.label_field, None) is None:
            raise DataError(f"has no {self.label_field!r} label, which {self.name} needs", event=int(index))
        return 0

    def subset(self, train: np.ndarray, classes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
        """``n_labels`` training events (sorted indices) of ``train``; default a seeded random draw.
        ``classes`` are :meth:`check_label`'s answers for them."""
        return np.sort(np.random.default_rng(seed).choice(train, n_labels, replace=False))

    def fit_options(self, events: Sequence) -> dict[str, Any]:
        """Options fitted on the training events (a list of labelled ``Data``) before training,
        given to the task's constructor. Default: none."""
        return {}

    def options(self) -> dict[str, Any]:
        """The constructor keywords of this task (:data:`OPTIONS`), JSON-ready."""
        return {name: getattr(self, name) for name in self.OPTIONS}


def get_task_class(name: str) -> type[DownstreamTask]:
    """The task class registered under ``name`` in :data:`TASKS`, imported now."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_task(name: str, **options) -> DownstreamTask:
    """Task ``name`` with those of ``options`` it takes (:attr:`DownstreamTask.OPTIONS`); the
    others (None, or meant for other tasks) are dropped."""
    cls = get_task_class(name)
    return cls(**{key: value for key, value in options.items() if key in cls.OPTIONS and value is not None})


def as_float_list(values) -> Optional[list[float]]:
    return None if values is None else [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]


__all__ = ["TASKS", "DownstreamTask", "get_task_class", "make_task", "mlp_head"]
