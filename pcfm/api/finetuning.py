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

A run is resumable like pretraining: rerunning :func:`finetune` with the same settings continues
from ``workdir/checkpoints/last.ckpt`` (a finished run is only tested again). Every checkpoint
records the run's settings (:data:`RUN_ENTRY`), so a workdir holding another run is never
resumed by mistake; a fresh start deletes the checkpoints and metrics of the run before, and
one run at a time works in a workdir (:func:`~pcfm.engine.training.hold_workdir`). With
validation events, ``workdir/checkpoints/best.ckpt`` keeps the weights of the lowest validation
loss, and the held-out metrics are those of whichever of the final and the best weights
validates lower; ``patience`` stops training when the validation loss stops improving.

Why one module of this length: the verb (settings, resume, early stopping, testing the best
weights) and its data module; what differs between tasks is in :mod:`pcfm.finetuning`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch_geometric.data import Data
from lightning.pytorch.callbacks import ModelCheckpoint
from torch_geometric.loader import DataLoader

from pcfm.api.pretraining import backbone_config
from pcfm.data import PointBudgetBatchSampler
from pcfm.io import atomic_path
from pcfm.engine.data import (PretrainDataModule, PretrainingView, event_sizes,
                              pretraining_item, split_indices)
from pcfm.engine.training import (CHECKPOINT_DIR, PatientEarlyStopping, check_integer, check_real,
                                  check_trainer_arguments, checkpoint_path, fit, hold_workdir, make_trainer,
                                  read_history, read_last_checkpoint, resume_advice, start_afresh)
from pcfm.errors import ArgumentError, DataError
from pcfm.nn import Backbone, BackboneConfig
from pcfm.finetuning import DownstreamTask, FinetuneModule, backbone_state, get_task_class, make_task
from pcfm.finetuning.task import HEAD_NORMS
from pcfm.finetuning.classification import balanced_subset  # noqa: F401 - its public home until 0.3
from pcfm.engine.checkpoints import CheckpointError, read_checkpoint

#: File of the held-out metrics in the workdir.
METRICS_FILE = "metrics.json"
#: File, next to ``last.ckpt``, of the weights with the lowest validation loss.
BEST_CHECKPOINT = "best.ckpt"
#: Checkpoint entry of a fine-tuning run: its ``settings`` and whether it ``finished``.
RUN_ENTRY = "pcfm_finetune_run"


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        module: the fine-tuned :class:`~pcfm.finetuning.FinetuneModule`.
        metrics: held-out test metrics (the task's :meth:`~pcfm.finetuning.DownstreamTask.metrics`) plus
            ``n_train`` and ``n_test`` events.
        metrics_path: ``workdir/metrics.json``: these metrics, the run's settings and ``training``.
        checkpoint_path: ``workdir/checkpoints/last.ckpt``: the final weights, and the point a
            rerun resumes from.
        history: one dict per logged step (``train/loss``, ``val/loss``, ...).
        tested_checkpoint: the checkpoint whose weights ``module`` holds and ``metrics`` measure:
            ``best.ckpt`` when it validates lower than the final weights, else ``last.ckpt``.
        training: ``steps`` trained, ``max_steps``, ``stopped_early``, ``patience``,
            ``resumed_from_step`` (None: started afresh), ``val_loss`` of the ``last`` and
            ``best`` weights, ``best_val_loss`` (None without validation), ``tested_checkpoint``
            and ``tested_step``.
    """

    module: FinetuneModule
    metrics: dict[str, float]
    metrics_path: Path
    checkpoint_path: Path
    history: list[dict[str, float]] = field(default_factory=list)
    tested_checkpoint: Optional[Path] = None
    training: dict[str, Any] = field(default_factory=dict)


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


class FinetuneDataModule(PretrainDataModule):
    """Train / validation / test loaders of labelled events for :class:`FinetuneModule`.

    Args:
        data: as :class:`~pcfm.engine.data.PretrainDataModule` (None simulates events).
        task: a name in :data:`~pcfm.finetuning.TASKS`, or a
            :class:`~pcfm.finetuning.DownstreamTask`: it says which events have a usable label,
            how ``n_labels`` are drawn and what is fitted on the training events.
        targets: regression targets (with a task name).
        n_labels: training events kept (None: all); balanced over classes for classification.
        test_fraction: share of the labelled events held out for testing (ignored with ``test_data``).
        test_data: a separate test set (files, a list of ``Data`` or a dataset): every usable
            event of it is tested, and none of ``data`` is held out for testing.
        val_data: a separate validation set, likewise: every usable event of it validates, and
            none of ``data`` is held out for validation (``val_fraction`` is ignored).
        **options: :class:`~pcfm.engine.data.PretrainDataModule` keywords (``geometry``,
            ``n_events``, ``val_fraction``, ``batch_points``, ``seed``, ``particles``, ...).
    """

    def __init__(self, data: Any = None, *, task: str | DownstreamTask, targets: Sequence[str] = ("incident_energy",),
                 n_labels: Optional[int] = None, test_fraction: float = 0.2, test_data: Any = None,
                 val_data: Any = None, **options):
        self.downstream = task if isinstance(task, DownstreamTask) else make_task(task, targets=tuple(targets))
        if data is None and options.get("geometry") is None:
            options["geometry"] = self.downstream.default_geometry
        super().__init__(data, **options)
        if n_labels is not None and n_labels < 1:
            raise ValueError(f"n_labels must be >= 1, got {n_labels}")
        self.task, self.targets = self.downstream.name, tuple(targets)
        self.n_labels, self.test_fraction, self.test_data = n_labels, float(test_fraction), test_data
        self.val_data = val_data
        self.label_field = self.downstream.label_field
        self.test_dataset: Optional[LabelledView] = None
        self._test_sizes = None
        self.event_classes: Optional[np.ndarray] = None  # classification: y of every dataset event (-1 unusable)

    def _usable(self, dataset, candidates: np.ndarray) -> np.ndarray:
        """The candidates whose label the task can use (its
        :meth:`~pcfm.finetuning.DownstreamTask.check_label` >= 0; e.g. not a regression event of
        unknown target, nor a classification event outside the classes). A DataError names an
        event with no label at all, or with per-point labels that do not match its points.
        """
        classes = np.full(len(dataset), -1, dtype=np.int64)
        for index in candidates:
            classes[index] = self.downstream.check_label(dataset[int(index)], int(index))
        self.event_classes = classes
        return candidates[classes[candidates] >= 0]

    def setup(self, stage: Optional[str] = None) -> None:
        """Open (or simulate) the data once and split it into train (n_labels), validation and test."""
        if self.dataset is not None:
            return
        # the given sets before the training data: _usable keeps the last one's classes
        test_dataset, test, test_sizes = self._given_set(self.test_data, "test_data")
        val_dataset, val, val_sizes = self._given_set(self.val_data, "val_data")
        dataset = self._open()
        sizes = event_sizes(dataset)
        labelled = self._usable(dataset, np.flatnonzero(sizes >= self.min_points))
        if len(labelled) < 2:
            raise DataError(f"{len(labelled)} event(s) with a usable {self.task} label and at least "
                            f"min_points={self.min_points} points (of {len(sizes)} events): need 2")
        if test is None:
            pool, test = split_indices(labelled, self.test_fraction, self.seed)
            test_dataset, test_sizes = dataset, sizes
        else:
            pool = labelled
        if val is None:
            train, val = split_indices(pool, self.val_fraction, self.seed + 1)
            val_dataset, val_sizes = dataset, sizes
        else:
            train = pool
        if self.n_labels is not None:
            if self.n_labels > len(train):
                raise ValueError(f"n_labels={self.n_labels} but only {len(train)} training events are available")
            train = self.downstream.subset(train, self.event_classes[train], self.n_labels, self.seed)
        self.dataset = dataset
        self.train_dataset = LabelledView(dataset, train, self.label_field)
        self.val_dataset = LabelledView(val_dataset, val, self.label_field)
        self.test_dataset = LabelledView(test_dataset, test, self.label_field)
        self._train_sizes, self._val_sizes, self._test_sizes = sizes[train], val_sizes[val], test_sizes[test]

    def _given_set(self, data: Any, name: str) -> tuple[Any, Optional[np.ndarray], Optional[np.ndarray]]:
        """A separately given test or validation set: (dataset, usable events, sizes), or Nones."""
        if data is None:
            return None, None, None
        dataset = self._open_given(data, name)
        sizes = event_sizes(dataset)
        try:
            usable = self._usable(dataset, np.flatnonzero(sizes >= self.min_points))
        except DataError as error:  # say which of the data sets holds the bad event
            raise DataError(f"{error.problem} (in {name})", error.path, error.event) from None
        if len(usable) == 0:
            raise DataError(f"{name} has no event with a usable {self.task} label and at least "
                            f"min_points={self.min_points} points (of {len(sizes)} events)")
        return dataset, usable, sizes

    def test_dataloader(self) -> DataLoader:
        sampler = PointBudgetBatchSampler(self._test_sizes, self.batch_points, shuffle=False,
                                          max_events=self.max_events)
        return DataLoader(self.test_dataset, batch_sampler=sampler, **self._workers())

    def fit_options(self) -> dict[str, Any]:
        """What the task fits on the training events before training (class weights, target
        standardisation, ...): :class:`~pcfm.finetuning.FinetuneModule` keywords."""
        return self.downstream.fit_options(list(self.train_dataset))


def module_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Task options as :class:`~pcfm.finetuning.FinetuneModule` keywords: its own parameters
    (the built-in tasks' options) as they are, any other under ``task_options``."""
    own = inspect.signature(FinetuneModule.__init__).parameters
    other = {key: value for key, value in options.items() if key not in own}
    return {**{key: value for key, value in options.items() if key in own}, **({"task_options": other} if other else {})}


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


class FinetuneRun(L.Callback):
    """Writes the run's settings into every checkpoint (:data:`RUN_ENTRY`), and whether training
    is over (``max_steps`` reached or stopped early), so that a rerun resumes only its own run and
    does not train a finished one again."""

    def __init__(self, settings: Mapping[str, Any], max_steps: int):
        self.settings, self.max_steps = dict(settings), int(max_steps)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        finished = trainer.global_step >= self.max_steps or bool(trainer.should_stop)
        checkpoint[RUN_ENTRY] = {"settings": self.settings, "finished": finished}


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, paths strings), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _digest(arrays: Sequence[tuple[str, Any]]) -> str:
    """Short SHA-256 of named tensors or arrays (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, value in arrays:
        value = value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


#: What the settings compared by :func:`_check_same_run` that are digests stand for.
DIGESTS = {"checkpoint_weights": "SHA-256 of the starting checkpoint's backbone weights; None: from scratch",
           "split": "digest of the train / validation / test events and their sizes: other data"}


def _check_same_run(path: Path, workdir: Path, stored: Optional[Mapping[str, Any]], wanted: Mapping[str, Any]) -> None:
    """Raise a CheckpointError naming ``path`` and the first setting that differs."""
    advice = resume_advice(workdir)
    if stored is None:
        raise CheckpointError(path, f"holds no record of a fine-tuning run's settings (a pretraining checkpoint, "
                                    f"or one written before fine-tuning was resumable); {advice}")
    for key in [*wanted, *(key for key in stored if key not in wanted)]:
        if stored.get(key) != wanted.get(key):
            meaning = f" ({DIGESTS[key]})" if key in DIGESTS else ""
            raise CheckpointError(path, f"belongs to another fine-tuning run: its {key} is {stored.get(key)!r}, "
                                        f"not {wanted.get(key)!r}{meaning}; {advice}")


def finetune(task: str, data: Any = None, *, checkpoint: Any = None,
             model: str | BackboneConfig | Mapping[str, Any] = "tiny", mode: str = "full",
             n_labels: Optional[int] = None, geometry: str | Sequence[str] | None = None, n_events: int = 1024,
             targets: Sequence[str] = ("incident_energy",), test_fraction: float = 0.2, test_data: Any = None,
             val_fraction: float = 0.1, val_data: Any = None, class_names: Optional[Sequence[str]] = None,
             max_steps: int = 500, batch_points: int = 20_000, lr: float = 5e-4, backbone_lr_scale: float = 0.1,
             head_norm: str = "batch",
             warmup_steps: Optional[int] = None, weight_decay: float = 0.05, augment: bool = True,
             workdir: str | os.PathLike = "pcfm_runs/finetune", resume: bool = True, patience: Optional[int] = None,
             min_steps: int = 0, seed: int = 0, accelerator: str = "auto",
             devices: Any = "auto", precision: Optional[str] = None, num_workers: int = 0,
             log_every_n_steps: int = 10, checkpoint_every_n_steps: int = 100, val_every_n_steps: Optional[int] = None,
             callbacks: Optional[Sequence[L.Callback]] = None, progress: bool = True,
             deterministic: bool | str = False, data_options: Optional[Mapping[str, Any]] = None) -> FinetuneResult:
    """Fine-tune a backbone with a task head, test it on held-out events and write the metrics.

    Args:
        task: a name in :data:`pcfm.finetuning.TASKS`: "classification" (particle class ``y``),
            "regression" (``targets``), "segmentation" (per-point LArTPC ``semantic``), or one
            registered there.
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
        test_fraction: share of labelled events held out for the test metrics, in [0, 1).
        test_data: a separate labelled test set (files / globs / folders, a list of ``Data`` or a
            dataset) instead: every usable event of it is tested and all of ``data`` is used for
            training and validation (``test_fraction`` is ignored). It is not part of the run's
            settings: a finished run can be tested again on other events.
        val_fraction: share of the remaining events used for the validation loss, in [0, 1) (0: none).
        val_data: a separate labelled validation set instead (as ``test_data``); ``val_fraction``
            is ignored. Like ``test_data`` it is not part of the run's settings.
        class_names: classification only: the names of the classes of ``y`` (default: the
            particle classes electron, photon, pion); ``y`` counts from 0 in this order.
        max_steps: optimiser steps (>= 1). batch_points: point budget of a batch (>= 1).
        lr: head learning rate (> 0). backbone_lr_scale: backbone lr / lr in "layerwise" mode (>= 0).
        head_norm: how an event-level head (classification, regression) normalises the pooled
            embedding: "batch" (default: each channel standardised over the batch's events, which
            keeps a from-scratch backbone from collapsing to one embedding in its first steps:
            :class:`~pcfm.finetuning.task.BatchStandardize`) or "layer" (LayerNorm per event, the
            head of pcfm 0.1).
        warmup_steps: linear warm-up (>= 0; default ``min(50, max_steps // 10)``). weight_decay:
            AdamW's (>= 0).
        augment: train on each event in a random symmetry of its detector (rotations about a
            calorimeter's axis by whole angular bins and a reflection; reflections and axis swaps of
            a LArTPC volume: :func:`pcfm.data.augment.augment_by_symmetry`).
        workdir: folder of the checkpoints (``checkpoints/last.ckpt``, ``checkpoints/best.ckpt``),
            logs and ``metrics.json``; one run at a time: it is locked while this run works there.
        resume: continue from ``workdir/checkpoints/last.ckpt`` when it exists (a finished run
            is only tested again); its recorded settings (task, mode, n_labels, seed, the
            starting checkpoint's weights, backbone, data options and split, schedule, patience,
            ...) must equal these (data files are compared by the events they hold, not by
            path). False starts afresh: it first deletes the workdir's checkpoints and
            ``metrics.json`` (the old CSV logs stay, no longer part of the run), so that a crash
            of the new run cannot leave the old one to be resumed or its metrics to be read.
        patience: stop after this many validations in a row without a lower ``val/loss``
            (Lightning's EarlyStopping); None: train ``max_steps``. Needs validation events.
        min_steps: with ``patience``, no stop before this step (validations before it count for
            the best weights, not against the patience): room to leave a plateau at chance.
        seed: seeds the weights of the head, the simulation, the splits and the label subset.
        checkpoint_every_n_steps: ``last.ckpt`` interval (it is also written at the end).
        val_every_n_steps: validation interval (default ``checkpoint_every_n_steps``); each
            validation that lowers ``val/loss`` rewrites ``best.ckpt``.
        accelerator, devices, precision, num_workers, log_every_n_steps, callbacks, progress,
            deterministic: as in :func:`pcfm.pretrain`.
        data_options: more :class:`~pcfm.engine.data.PretrainDataModule` keywords
            (``particles``, ``energy_range``, ``theta_range``, ``lartpc_points``, ``max_events``, ...).

    Returns:
        :class:`FinetuneResult`. Its metrics measure the final weights, or with validation events
        whichever of the final weights and ``best.ckpt`` has the lower validation loss (after
        early stopping: ``best.ckpt``); ``training`` says which.

    Raises:
        ArgumentError: a numeric argument out of its range (a ValueError naming it and the
            value), before any work.
        WorkdirInUseError: another run works in ``workdir`` now (the message names its pid,
            host and start time).
        CheckpointError: with ``resume``, ``last.ckpt`` is corrupt, or belongs to another run
            (the message names it and the first differing setting, and says that
            ``resume=False`` starts afresh).
        ValueError: ``patience`` without validation events.
    """
    check_trainer_arguments(max_steps=max_steps, batch_points=batch_points, lr=lr, warmup_steps=warmup_steps,
                            weight_decay=weight_decay, val_fraction=val_fraction, n_events=n_events,
                            num_workers=num_workers, seed=seed, log_every_n_steps=log_every_n_steps,
                            checkpoint_every_n_steps=checkpoint_every_n_steps, val_every_n_steps=val_every_n_steps)
    check_integer("n_labels", n_labels, 1, optional=True)
    check_real("test_fraction", test_fraction, 0.0, 1.0)
    check_real("backbone_lr_scale", backbone_lr_scale)
    if head_norm not in HEAD_NORMS:
        raise ArgumentError(f"head_norm must be one of {list(HEAD_NORMS)}, got {head_norm!r}")
    check_integer("patience", patience, 1, optional=True)
    check_integer("min_steps", min_steps, 0)
    if min_steps > max_steps:
        raise ArgumentError(f"min_steps must be between 0 and max_steps={max_steps}, got {min_steps}")
    task_options = get_task_class(task).OPTIONS  # an unknown task fails here, before any work
    workdir = Path(workdir)
    records = (f"{CHECKPOINT_DIR}/{BEST_CHECKPOINT}", METRICS_FILE)
    with hold_workdir(workdir, records):
        config, weights = pretrained_backbone(checkpoint, model)
        if warmup_steps is None:
            warmup_steps = min(50, max_steps // 10)
        val_every = val_every_n_steps or checkpoint_every_n_steps
        L.seed_everything(seed, workers=True, verbose=False)
        datamodule = FinetuneDataModule(data, task=task, targets=targets, n_labels=n_labels,
                                        test_fraction=test_fraction, test_data=test_data, val_data=val_data,
                                        geometry=geometry,
                                        n_events=n_events,
                                        val_fraction=val_fraction, batch_points=batch_points, num_workers=num_workers,
                                        seed=seed, **dict(data_options or {}))
        datamodule.setup("fit")
        validating = len(datamodule.val_dataset) > 0
        if patience is not None and not validating:
            raise ValueError(f"patience={patience} stops on the validation loss, but there are no validation events "
                             f"(val_fraction={val_fraction}); give val_fraction > 0, val_data or patience=None")
        separate_test = test_data is not None
        names = ("train", "val") if separate_test else ("train", "val", "test")
        parts = (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset)[:len(names)]
        sizes = (datamodule._train_sizes, datamodule._val_sizes, datamodule._test_sizes)[:len(names)]
        settings = _plain({
            "task": task, "mode": mode, "n_labels": n_labels, "seed": seed,
            "checkpoint_weights": None if weights is None else _digest(sorted(weights.items())),
            "backbone": config.to_dict(), "targets": list(targets) if "targets" in task_options else None,
            "geometry": geometry, "n_events": n_events if data is None else None,
            "data_options": dict(data_options or {}), "test_fraction": None if separate_test else test_fraction,
            "val_fraction": None if val_data is not None else val_fraction, "val_data": val_data is not None,
            "class_names": None if class_names is None else list(class_names),
            "split": _digest([(name, np.asarray(part.indices)) for name, part in zip(names, parts)]
                             + [(f"{name}_sizes", np.asarray(size)) for name, size in zip(names, sizes)]),
            "max_steps": max_steps, "batch_points": batch_points, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
            **({"head_norm": head_norm} if head_norm != "layer" else {}),  # runs from before it match
            "warmup_steps": warmup_steps, "weight_decay": weight_decay, "augment": augment,
            "val_every_n_steps": val_every if validating else None, "patience": patience,
            **({"min_steps": min_steps} if min_steps and patience is not None else {}),  # runs from before it match
        })

        last, best = checkpoint_path(workdir), workdir / CHECKPOINT_DIR / BEST_CHECKPOINT
        stored = None
        if resume and last.exists():
            stored = read_last_checkpoint(workdir)
            _check_same_run(last, workdir, (stored.get(RUN_ENTRY) or {}).get("settings"), settings)
        else:  # a fresh start: no checkpoint or metrics of an earlier run may be resumed or read
            start_afresh(workdir, records)
        finished = stored is not None and bool(stored[RUN_ENTRY]["finished"])

        module = FinetuneModule(config, task=task, mode=mode, targets=targets, lr=lr,
                                backbone_lr_scale=backbone_lr_scale, weight_decay=weight_decay,
                                warmup_steps=warmup_steps, max_steps=max_steps, augment=augment, augment_seed=seed,
                                class_names=class_names, head_norm=head_norm,
                                **module_options(datamodule.fit_options()))
        if weights is not None:
            module.backbone.load_state_dict(weights)
        run_callbacks: list[L.Callback] = [FinetuneRun(settings, max_steps)]
        if validating:
            run_callbacks.append(ModelCheckpoint(dirpath=best.parent, filename=best.stem, monitor="val/loss",
                                                 mode="min", save_top_k=1, auto_insert_metric_name=False,
                                                 enable_version_counter=False))
            if patience is not None:
                run_callbacks.append(PatientEarlyStopping(min_steps, monitor="val/loss", mode="min", patience=patience,
                                                          check_on_train_epoch_end=False))
        trainer = make_trainer(workdir, max_steps=max_steps, accelerator=accelerator, devices=devices,
                               precision=precision, log_every_n_steps=log_every_n_steps,
                               checkpoint_every_n_steps=checkpoint_every_n_steps, val_every_n_steps=val_every,
                               callbacks=[*run_callbacks, *(callbacks or [])], progress=progress,
                               deterministic=deterministic, logger=not finished, progress_label=f"finetune {task}")
        if finished:  # nothing left to train: test it again
            module.load_state_dict(stored["state_dict"])
            steps = int(stored["global_step"])
        else:
            fit(trainer, module, datamodule, resume=resume, checkpoint=stored)
            steps = int(trainer.global_step)
        resumed_from = None if stored is None else int(stored["global_step"])
        del stored

        # Testing, and choosing the weights to test, stays out of the training log.
        evaluator = trainer if finished else make_trainer(workdir, max_steps=max_steps, accelerator=accelerator,
                                                          devices=devices, precision=precision, progress=False,
                                                          logger=False)
        tested, tested_step, val_losses = last, steps, {}
        if validating:
            def validate() -> float:
                return float(evaluator.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"])

            val_losses["last"] = validate()
            if best.is_file():
                final = {key: value.detach().clone() for key, value in module.state_dict().items()}
                best_checkpoint = read_checkpoint(best)
                module.load_state_dict(best_checkpoint["state_dict"])
                val_losses["best"] = validate()
                if val_losses["best"] <= val_losses["last"]:
                    tested, tested_step = best, int(best_checkpoint["global_step"])
                else:
                    module.load_state_dict(final)
        training = {"steps": steps, "max_steps": max_steps, "stopped_early": steps < max_steps, "patience": patience,
                    "min_steps": min_steps,
                    "resumed_from_step": resumed_from, "val_loss": val_losses,
                    "best_val_loss": min(val_losses.values()) if val_losses else None,
                    "tested_checkpoint": str(tested), "tested_step": tested_step}

        batches = evaluator.predict(module, dataloaders=datamodule.test_dataloader())
        prediction, truth = (torch.cat([batch[key] for batch in batches]).numpy() for key in ("prediction", "truth"))
        metrics = module.task.metrics(prediction, truth)
        metrics.update(n_train=len(datamodule.train_dataset), n_test=len(datamodule.test_dataset))
        record = {"task": task, "mode": mode, "n_labels": n_labels,
                  "targets": list(targets) if "targets" in task_options else None,
                  "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None,
                  "backbone": config.to_dict(), "max_steps": max_steps, "seed": seed,
                  "test_set": "test_data" if separate_test else f"{test_fraction:g} of data", "metrics": metrics,
                  "training": training}
        metrics_path = workdir / METRICS_FILE
        with atomic_path(metrics_path) as temporary:
            temporary.write_text(json.dumps(record, indent=2, allow_nan=True))
        return FinetuneResult(module=module, metrics=metrics, metrics_path=metrics_path, checkpoint_path=last,
                              history=read_history(workdir), tested_checkpoint=tested, training=training)
