"""Fine-tuning entry point: :func:`finetune`, and the labelled data it trains and tests on.

``finetune("classification", checkpoint="pcfm_runs/pretrain/checkpoints/last.ckpt", n_labels=100)``
loads a pretrained backbone, fine-tunes it with a head on 100 labelled events (balanced over
the classes) and writes its held-out metrics to ``workdir/metrics.json``. With no data it
simulates events on ``geometry`` (electrons, photons and pions on "calochallenge-ds2" by
default; LArTPC events for segmentation); any geometry runs with the same code, since the
backbone sees points in mm, never cell indices.

:class:`FinetuneDataModule` reuses the pretraining data machinery
(:class:`~pcfm.engine.data.PretrainDataModule`: file / dataset / simulation, point-budget
batches) and splits the labelled events three ways: a held-out test part, a validation part
and the training part, of which ``n_labels`` events are kept.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from pcfm.api import backbone_config
from pcfm.data import PointBudgetBatchSampler
from pcfm.data.atomic import atomic_path
from pcfm.engine.data import (DEFAULT_GEOMETRY, PretrainDataModule, PretrainingView, event_sizes,
                              pretraining_item, split_indices)
from pcfm.engine.training import checkpoint_path, fit, make_trainer, read_history
from pcfm.errors import DataError
from pcfm.nn import Backbone, BackboneConfig
from pcfm.tasks.finetune import (CLASS_NAMES, TASKS, FinetuneModule, backbone_state, log_visible_energy,
                                 regression_values, task_metrics)
from pcfm.tasks.pretrain import read_checkpoint

#: Geometry simulated for segmentation when neither data nor a geometry is given.
DEFAULT_SEGMENTATION_GEOMETRY = "lartpc-768"
#: File of the held-out metrics in the workdir.
METRICS_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        module: the fine-tuned :class:`~pcfm.tasks.finetune.FinetuneModule`.
        metrics: held-out test metrics (:func:`~pcfm.tasks.finetune.task_metrics`) plus
            ``n_train`` and ``n_test`` events.
        metrics_path: ``workdir/metrics.json``: these metrics and the run's settings.
        checkpoint_path: ``workdir/checkpoints/last.ckpt`` of the fine-tuned model.
        history: one dict per logged step (``train/loss``, ``val/loss``, ...).
    """

    module: FinetuneModule
    metrics: dict[str, float]
    metrics_path: Path
    checkpoint_path: Path
    history: list[dict[str, float]] = field(default_factory=list)


class LabelledView(PretrainingView):
    """Items as :func:`~pcfm.engine.data.pretraining_item` plus the task's label field, if any
    (regression targets are event fields every item already has)."""

    def __init__(self, dataset, indices: Sequence[int], label_field: Optional[str]):
        super().__init__(dataset, indices)
        self.label_field = label_field

    def __getitem__(self, i: int) -> Data:
        index = int(self.indices[i])
        source = self.dataset[index]
        item = pretraining_item(source, index)
        if self.label_field is not None:
            item[self.label_field] = source[self.label_field]
        return item


def balanced_subset(indices: np.ndarray, classes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """``n_labels`` of ``indices``, as even over ``classes`` as they allow, drawn with ``seed``.

    Events are taken round-robin over the classes in a seeded random order, so every class gets
    ``n_labels // K`` (or one more) unless it has fewer events, whose share goes to the others.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(indices))
    classes = classes[order]
    rank = np.empty(len(order), dtype=np.int64)  # position of each event within its class
    by_class = np.argsort(classes, kind="stable")
    starts = np.searchsorted(classes[by_class], classes[by_class])
    rank[by_class] = np.arange(len(order)) - starts
    take = np.lexsort((rng.random(len(order)), rank))[:n_labels]
    return np.sort(indices[order[take]])


class FinetuneDataModule(PretrainDataModule):
    """Train / validation / test loaders of labelled events for :class:`FinetuneModule`.

    Args:
        data: as :class:`~pcfm.engine.data.PretrainDataModule` (None simulates events).
        task: one of :data:`~pcfm.tasks.finetune.TASKS`; fixes the label read
            (``y``, the regression targets, ``semantic``).
        targets: regression targets.
        n_labels: training events kept (None: all); balanced over classes for classification.
        test_fraction: share of the labelled events held out for testing.
        **options: :class:`~pcfm.engine.data.PretrainDataModule` keywords (``geometry``,
            ``n_events``, ``val_fraction``, ``batch_points``, ``seed``, ``particles``, ...).
    """

    def __init__(self, data: Any = None, *, task: str, targets: Sequence[str] = ("incident_energy",),
                 n_labels: Optional[int] = None, test_fraction: float = 0.2, **options):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        if data is None and options.get("geometry") is None:
            options["geometry"] = DEFAULT_SEGMENTATION_GEOMETRY if task == "segmentation" else DEFAULT_GEOMETRY
        super().__init__(data, **options)
        if n_labels is not None and n_labels < 1:
            raise ValueError(f"n_labels must be >= 1, got {n_labels}")
        self.task, self.targets = task, tuple(targets)
        self.n_labels, self.test_fraction = n_labels, float(test_fraction)
        self.label_field = {"classification": "y", "segmentation": "semantic"}.get(task)
        self.test_dataset: Optional[LabelledView] = None
        self._test_sizes = None
        self.event_classes: Optional[np.ndarray] = None  # classification: y of every dataset event (-1 unusable)

    def _usable(self, dataset, candidates: np.ndarray) -> np.ndarray:
        """The candidates whose label this task can use.

        Left out: regression events with an unknown (NaN) target, classification events of a
        particle outside :data:`~pcfm.data.PARTICLE_CLASSES` (``y`` -1). A DataError names an
        event with no label at all, or with per-point labels that do not match its points.
        """
        keep = np.zeros(len(candidates), dtype=bool)
        classes = np.full(len(dataset), -1, dtype=np.int64)
        for position, index in enumerate(candidates):
            item = dataset[int(index)]
            if self.task == "regression":
                values = regression_values(pretraining_item(item, int(index)), self.targets)
                keep[position] = bool(torch.isfinite(values).all())
                continue
            label = getattr(item, self.label_field, None)
            if label is None:
                raise DataError(f"has no {self.label_field!r} label, which {self.task} needs", event=int(index))
            if self.task == "classification":
                classes[index] = int(label.reshape(-1)[0])
                keep[position] = classes[index] >= 0
            elif label.numel() != item.num_nodes:
                raise DataError(f"has {label.numel()} {self.label_field!r} labels for {item.num_nodes} points",
                                event=int(index))
            else:
                keep[position] = True
        self.event_classes = classes
        return candidates[keep]

    def setup(self, stage: Optional[str] = None) -> None:
        """Open (or simulate) the data once and split it into train (n_labels), validation and test."""
        if self.dataset is not None:
            return
        dataset = self._open()
        sizes = event_sizes(dataset)
        labelled = self._usable(dataset, np.flatnonzero(sizes >= self.min_points))
        if len(labelled) < 2:
            raise DataError(f"{len(labelled)} event(s) with a usable {self.task} label and at least "
                            f"min_points={self.min_points} points (of {len(sizes)} events): need 2")
        pool, test = split_indices(labelled, self.test_fraction, self.seed)
        train, val = split_indices(pool, self.val_fraction, self.seed + 1)
        if self.n_labels is not None:
            if self.n_labels > len(train):
                raise ValueError(f"n_labels={self.n_labels} but only {len(train)} training events are available")
            if self.task == "classification":
                train = balanced_subset(train, self.event_classes[train], self.n_labels, self.seed)
            else:
                train = np.sort(np.random.default_rng(self.seed).choice(train, self.n_labels, replace=False))
        self.dataset = dataset
        self.train_dataset, self.val_dataset, self.test_dataset = (
            LabelledView(dataset, part, self.label_field) for part in (train, val, test))
        self._train_sizes, self._val_sizes, self._test_sizes = sizes[train], sizes[val], sizes[test]

    def test_dataloader(self) -> DataLoader:
        sampler = PointBudgetBatchSampler(self._test_sizes, self.batch_points, shuffle=False,
                                          max_events=self.max_events)
        return DataLoader(self.test_dataset, batch_sampler=sampler, **self._workers())

    def class_weights(self) -> list[float]:
        """Segmentation: inverse frequency of each class among the training points, scaled so that
        the weighted mean over the training points is 1 (classes without points weigh 1)."""
        counts = np.zeros(len(CLASS_NAMES["segmentation"]))
        for item in self.train_dataset:
            labels = item.semantic.numpy()
            counts += np.bincount(labels[labels >= 0], minlength=len(counts))[:len(counts)]
        present = counts > 0
        weights = np.ones_like(counts)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        return weights.tolist()

    def regression_statistics(self) -> tuple[list[float], list[float]]:
        """Mean and spread over the training events of each target and of the log visible energy."""
        events = Batch.from_data_list(list(self.train_dataset))
        values = torch.cat([regression_values(events, self.targets), log_visible_energy(events)], 1).double()
        std = values.std(0) if len(values) > 1 else torch.ones(values.shape[1], dtype=values.dtype)
        return values.mean(0).tolist(), std.clamp_min(1e-6).tolist()


def pretrained_backbone(checkpoint: Any, model: str | BackboneConfig | Mapping[str, Any]
                        ) -> tuple[BackboneConfig, Optional[dict[str, torch.Tensor]]]:
    """The backbone config and weights to start from: those of ``checkpoint`` (a checkpoint path,
    a module with a ``.backbone``, or a :class:`~pcfm.nn.Backbone`), else ``model`` untrained."""
    if checkpoint is None:
        return backbone_config(model), None
    if isinstance(checkpoint, (str, os.PathLike)):
        stored = read_checkpoint(checkpoint)
        return BackboneConfig.from_dict(stored["hyper_parameters"]["backbone"]), backbone_state(stored["state_dict"])
    backbone = checkpoint if isinstance(checkpoint, Backbone) else getattr(checkpoint, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"checkpoint must be a path, a module with a .backbone or a Backbone, got {type(checkpoint)}")
    return backbone.config, {key: value.detach().cpu().clone() for key, value in backbone.state_dict().items()}


def finetune(task: str, data: Any = None, *, checkpoint: Any = None,
             model: str | BackboneConfig | Mapping[str, Any] = "tiny", mode: str = "full",
             n_labels: Optional[int] = None, geometry: str | Sequence[str] | None = None, n_events: int = 1024,
             targets: Sequence[str] = ("incident_energy",), test_fraction: float = 0.2, val_fraction: float = 0.1,
             max_steps: int = 500, batch_points: int = 20_000, lr: float = 5e-4, backbone_lr_scale: float = 0.1,
             warmup_steps: Optional[int] = None, weight_decay: float = 0.05,
             workdir: str | os.PathLike = "pcfm_runs/finetune", seed: int = 0, accelerator: str = "auto",
             devices: Any = "auto", precision: Optional[str] = None, num_workers: int = 0,
             log_every_n_steps: int = 10, val_every_n_steps: Optional[int] = None,
             callbacks: Optional[Sequence[L.Callback]] = None, progress: bool = True,
             data_options: Optional[Mapping[str, Any]] = None) -> FinetuneResult:
    """Fine-tune a backbone with a task head, test it on held-out events and write the metrics.

    Args:
        task: "classification" (particle class ``y``), "regression" (``targets``) or
            "segmentation" (per-point LArTPC ``semantic``).
        data: files / globs / folders, or a dataset (or list) of PyG ``Data`` carrying the
            task's labels; None simulates ``n_events`` events per ``geometry``.
        checkpoint: a pretraining (or fine-tuning) checkpoint path, a ``PretrainModule`` or a
            ``Backbone`` to start from; None trains the ``model`` preset from scratch.
        model: backbone preset, config or dict of overrides (ignored with a checkpoint).
        mode: "linear" (frozen backbone), "full" (all at ``lr``) or "layerwise" (backbone at
            ``backbone_lr_scale * lr``).
        n_labels: training events kept (balanced over classes and seeded for classification,
            seeded random otherwise); None: all.
        geometry: geometry to simulate (default "calochallenge-ds2"; "lartpc-768" for
            segmentation), or with files a name overriding the file's.
        n_events: simulated events (``data=None``).
        targets: regression targets among "incident_energy" (predicted as log E) and "theta".
        test_fraction: share of labelled events held out for the test metrics.
        val_fraction: share of the remaining events used for the validation loss (0: none).
        max_steps: optimiser steps. batch_points: point budget of a batch.
        lr: head learning rate. backbone_lr_scale: backbone lr / lr in "layerwise" mode.
        warmup_steps: linear warm-up (default ``min(50, max_steps // 10)``). weight_decay: AdamW's.
        workdir: folder of the checkpoint, logs and ``metrics.json`` (a new run overwrites them).
        seed: seeds the weights of the head, the simulation, the splits and the label subset.
        accelerator, devices, precision, num_workers, log_every_n_steps, val_every_n_steps,
            callbacks, progress: as in :func:`pcfm.pretrain`.
        data_options: more :class:`~pcfm.engine.data.PretrainDataModule` keywords
            (``particles``, ``energy_range``, ``theta_range``, ``lartpc_points``, ``max_events``, ...).

    Returns:
        :class:`FinetuneResult`.
    """
    config, weights = pretrained_backbone(checkpoint, model)
    if warmup_steps is None:
        warmup_steps = min(50, max_steps // 10)
    workdir = Path(workdir)
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = FinetuneDataModule(data, task=task, targets=targets, n_labels=n_labels,
                                    test_fraction=test_fraction, geometry=geometry, n_events=n_events,
                                    val_fraction=val_fraction, batch_points=batch_points, num_workers=num_workers,
                                    seed=seed, **dict(data_options or {}))
    datamodule.setup("fit")
    statistics = {}
    if task == "regression":
        statistics["target_mean"], statistics["target_std"] = datamodule.regression_statistics()
    if task == "segmentation":
        statistics["class_weights"] = datamodule.class_weights()
    module = FinetuneModule(config, task=task, mode=mode, targets=targets, lr=lr,
                            backbone_lr_scale=backbone_lr_scale, weight_decay=weight_decay,
                            warmup_steps=warmup_steps, max_steps=max_steps, **statistics)
    if weights is not None:
        module.backbone.load_state_dict(weights)
    trainer = make_trainer(workdir, max_steps=max_steps, accelerator=accelerator, devices=devices,
                           precision=precision, log_every_n_steps=log_every_n_steps,
                           checkpoint_every_n_steps=max_steps, val_every_n_steps=val_every_n_steps,
                           callbacks=callbacks, progress=progress)
    fit(trainer, module, datamodule, resume=False)

    batches = trainer.predict(module, dataloaders=datamodule.test_dataloader())
    prediction, truth = (torch.cat([batch[key] for batch in batches]).numpy() for key in ("prediction", "truth"))
    metrics = task_metrics(task, prediction, truth, targets)
    metrics.update(n_train=len(datamodule.train_dataset), n_test=len(datamodule.test_dataset))
    record = {"task": task, "mode": mode, "n_labels": n_labels, "targets": list(targets) if task == "regression"
              else None, "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None,
              "backbone": config.to_dict(), "max_steps": max_steps, "seed": seed, "metrics": metrics}
    metrics_path = workdir / METRICS_FILE
    with atomic_path(metrics_path) as temporary:
        temporary.write_text(json.dumps(record, indent=2, allow_nan=True))
    return FinetuneResult(module=module, metrics=metrics, metrics_path=metrics_path,
                          checkpoint_path=checkpoint_path(workdir), history=read_history(workdir))
