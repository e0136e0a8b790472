"""The Lightning Trainer of pretraining: checkpoints, automatic resume, precision, logging.

A run lives in a working folder::

    workdir/checkpoints/last.ckpt      saved every N steps and at the end (atomically: a crash
                                        while saving leaves the previous one intact)
    workdir/logs/version_K/metrics.csv one CSV log per start of the run (CSVLogger)

:func:`fit` resumes from ``workdir/checkpoints/last.ckpt`` when it exists (``resume=True``):
weights, optimiser, schedule, step count, sampler epoch and position in the epoch are restored
(:mod:`pcfm.engine.data` makes the loader resumable, :mod:`pcfm.tasks.pretrain` seeds every
step from the step number), so an interrupted run ends with the weights of an uninterrupted one.
:func:`read_history` joins the CSV logs of all the starts of a run into one loss history.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from pcfm.io import atomic_path
from pcfm.engine.progress import progress_callback
from pcfm.engine.checkpoints import CheckpointError, read_checkpoint

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOG_DIR = "logs"
#: In ``workdir/logs``: the log versions of the current run (its first start and its resumptions).
VERSIONS_FILE = "versions.json"
#: Strategy names that become DDP with ``find_unused_parameters=True`` (an objective may leave
#: parts of the backbone unused, e.g. masked modelling never calls the per-point read-out).
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed (:func:`pcfm.io.atomic_path`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)


class PatientEarlyStopping(EarlyStopping):
    """EarlyStopping that cannot end a run before ``min_steps``.

    A network can sit on a plateau (a classifier at chance, loss ln 2) for a few hundred steps
    before it finds the signal; plain patience would stop it there. Validations before
    ``min_steps`` still update the best loss (and ``best.ckpt``), but do not count against the
    patience; a non-finite loss stops at once, as in Lightning."""

    def __init__(self, min_steps: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.min_steps = int(min_steps)
        self._step = 0

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._step = trainer.global_step
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor):
        if self._step < self.min_steps and torch.isfinite(current):
            if self.monitor_op(current - self.min_delta, self.best_score.to(current.device)):
                self.best_score = current
            self.wait_count = 0
            return False, None
        return super()._evaluate_stopping_criteria(current)


class FinalCheckpoint(Callback):
    """Save ``last.ckpt`` when training ends, whatever the step (ModelCheckpoint saves every N)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)


class RunLogVersions(Callback):
    """Remembers, in the checkpoint, the CSV log versions of every start of this run, and writes
    them to ``workdir/logs/versions.json`` for :func:`read_history`."""

    def __init__(self):
        self.versions: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, CSVLogger):
            return
        if logger.version not in self.versions:
            self.versions.append(logger.version)
        if trainer.is_global_zero:
            with atomic_path(Path(logger.root_dir) / VERSIONS_FILE) as temporary:
                temporary.write_text(json.dumps({"versions": self.versions}))

    def state_dict(self) -> dict[str, Any]:
        return {"versions": list(self.versions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = [v for v in self.versions if v not in state_dict["versions"]]
        self.versions = list(state_dict["versions"]) + current


def checkpoint_path(workdir: str | os.PathLike) -> Path:
    """``workdir/checkpoints/last.ckpt``."""
    return Path(workdir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on a GPU that has it, full precision otherwise (CPU)."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_strategy(strategy: Any, accelerator: str, devices: Any) -> Any:
    """DDP (with unused parameters allowed) for DDP names and for "auto" over several GPUs."""
    if isinstance(strategy, str) and strategy in DDP_START_METHODS:
        return DDPStrategy(start_method=DDP_START_METHODS[strategy], find_unused_parameters=True)
    if strategy == "auto":
        on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        count = torch.cuda.device_count() if devices in ("auto", -1, "-1") else (
            len(devices) if isinstance(devices, (list, tuple)) else int(devices))
        if on_gpu and count > 1:
            return DDPStrategy(find_unused_parameters=True)
    return strategy


def make_trainer(workdir: str | os.PathLike, *, max_steps: int, accelerator: str = "auto", devices: Any = "auto",
                 strategy: Any = "auto", precision: Optional[str] = None, gradient_clip_val: float = 1.0,
                 log_every_n_steps: int = 10, checkpoint_every_n_steps: int = 100,
                 val_every_n_steps: Optional[int] = None, callbacks: Optional[Sequence[Callback]] = None,
                 progress: bool = True, deterministic: bool | str = False, logger: bool = True,
                 progress_label: str = "train") -> L.Trainer:
    """A Trainer writing to ``workdir`` (module docstring).

    Args:
        max_steps: optimiser steps to train for.
        accelerator, devices, strategy: as in Lightning; DDP names get ``find_unused_parameters``.
        precision: None picks :func:`default_precision`.
        gradient_clip_val: clip the global gradient norm to this (None or 0: no clipping).
        log_every_n_steps: CSV / progress-bar logging interval.
        checkpoint_every_n_steps: ``last.ckpt`` interval (also saved at the end).
        val_every_n_steps: validation interval in steps (default: ``checkpoint_every_n_steps``).
        callbacks: more Lightning callbacks.
        progress: show progress: a bar on a terminal, else a line every 5 % of the run
            (:mod:`pcfm.engine.progress`), so that logs and pipes see it too.
        deterministic: passed to the Trainer (True, False or "warn").
        logger: write the CSV log.
        progress_label: what the progress lines start with ("pretrain", "finetune").
    """
    workdir = Path(workdir)
    checkpoints = workdir / CHECKPOINT_DIR
    all_callbacks = [
        ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every_n_steps),
        FinalCheckpoint(checkpoints / LAST_CHECKPOINT),
        RunLogVersions(),
        *(callbacks or []),
    ]
    shown = progress_callback(progress_label, log_every_n_steps) if progress else None
    if shown is not None:
        all_callbacks.append(shown)
    return L.Trainer(
        default_root_dir=workdir, max_steps=max_steps, max_epochs=-1, accelerator=accelerator, devices=devices,
        strategy=resolve_strategy(strategy, accelerator, devices),
        precision=precision or default_precision(accelerator), gradient_clip_val=gradient_clip_val or None,
        log_every_n_steps=log_every_n_steps, callbacks=all_callbacks,
        logger=CSVLogger(workdir, name=LOG_DIR) if logger else False,
        enable_progress_bar=isinstance(shown, ProgressBar), enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=None, val_check_interval=val_every_n_steps or checkpoint_every_n_steps,
        use_distributed_sampler=False, deterministic=deterministic, plugins=[AtomicCheckpointIO()],
    )


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, *,
        resume: bool = True, checkpoint: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """``trainer.fit``, resumed from the run's ``last.ckpt`` when ``resume`` and it exists.

    The checkpoint is checked first, so a corrupt one, or one of another model, gives a
    :class:`~pcfm.tasks.pretrain.CheckpointError` naming it; ``checkpoint`` is its content when
    the caller has read it already (it is then not read again for the check). Returns the
    checkpoint resumed from.
    """
    last = checkpoint_path(trainer.default_root_dir)
    resumed = last if resume and last.is_file() else None
    if resumed is not None:
        check_same_run(checkpoint if checkpoint is not None else read_checkpoint(resumed), module, resumed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed)
    return resumed


def check_same_run(checkpoint: dict[str, Any], module: L.LightningModule, path: Path) -> None:
    """Resuming needs the model the checkpoint was written for: the module says what differs
    (:meth:`~pcfm.engine.module.PcfmModule.resume_problem`), and the error says it plainly."""
    problem = module.resume_problem(checkpoint["hyper_parameters"]) if hasattr(module, "resume_problem") else None
    if problem is not None:
        raise CheckpointError(path, f"{problem}; pass resume=False (it will be overwritten) or another workdir")


def read_history(workdir: str | os.PathLike, versions: Optional[Sequence[int]] = None) -> list[dict[str, float]]:
    """Logged metrics of a run, one dict per logged step, sorted by step.

    Joins ``workdir/logs/version_K/metrics.csv`` for ``versions`` (default: those of the current
    run, from ``logs/versions.json``); when a resumed start logged a step again, its values
    replace the earlier ones. Empty cells are left out of the dicts.
    """
    log_dir = Path(workdir) / LOG_DIR
    if versions is None:
        versions_file = log_dir / VERSIONS_FILE
        versions = json.loads(versions_file.read_text())["versions"] if versions_file.is_file() else []
    by_step: dict[int, dict[str, float]] = {}
    for version in versions:
        path = log_dir / f"version_{version}" / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        restarted: set[int] = set()
        for row in rows:
            step = int(row["step"])
            if step not in restarted:  # a later start overrides what earlier ones logged at this step
                by_step[step] = {}
                restarted.add(step)
            by_step[step].update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return [by_step[step] for step in sorted(by_step)]
