"""The Lightning Trainer of pretraining: checkpoints, automatic resume, precision, logging.

A run lives in a working folder::

    workdir/checkpoints/last.ckpt      saved every N steps and at the end (atomically: a crash
                                        while saving leaves the previous one intact)
    workdir/logs/version_K/metrics.csv one CSV log per start of the run (CSVLogger)
    workdir/pcfm.lock                  while a run works in the folder (:func:`hold_workdir`)

:func:`fit` resumes from ``workdir/checkpoints/last.ckpt`` when it exists (``resume=True``):
weights, optimiser, schedule, step count, sampler epoch and position in the epoch are restored
(:mod:`pcfm.engine.data` makes the loader resumable, :mod:`pcfm.tasks.pretrain` seeds every
step from the step number), so an interrupted run ends with the weights of an uninterrupted one.
A fresh start first deletes the checkpoints and records of the run before it
(:func:`start_afresh`), and checkpoints always take the same names, so that a crash of the new
run can never leave the old one to be resumed. :func:`read_history` joins the CSV logs of all
the starts of a run into one loss history.

One run at a time per folder: :func:`hold_workdir` locks it (a lock that a killed run releases)
and removes the temporary files a killed run left there.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from pcfm.io import LockHeld, atomic_path, describe_holder, exclusive_lock, remove_leftover_temporaries
from pcfm.engine.progress import progress_callback
from pcfm.engine.checkpoints import CheckpointError, read_checkpoint
from pcfm.errors import ArgumentError, WorkdirInUseError  # noqa: F401  (WorkdirInUseError: also imported from here)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOG_DIR = "logs"
#: In ``workdir/logs``: the log versions of the current run (its first start and its resumptions).
VERSIONS_FILE = "versions.json"
#: In the workdir while a run works there: the lock file (:func:`hold_workdir`).
LOCK_FILE = "pcfm.lock"
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
        # no version counter: a fresh start writes last.ckpt itself, never last-v1.ckpt beside an old one
        ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every_n_steps,
                        enable_version_counter=False),
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
    """``trainer.fit``, resumed from the run's ``last.ckpt`` when ``resume`` and it exists; else
    a fresh start, which first deletes the checkpoints of the run before (:func:`start_afresh`).

    The checkpoint is checked first, so a corrupt one, or one of another model, gives a
    :class:`~pcfm.tasks.pretrain.CheckpointError` naming it (and saying that ``resume=False``
    starts afresh); ``checkpoint`` is its content when the caller has read it already (it is
    then not read again for the check). Returns the checkpoint resumed from.
    """
    workdir = Path(trainer.default_root_dir)
    last = checkpoint_path(workdir)
    resumed = last if resume and last.exists() else None
    if resumed is not None:
        check_same_run(checkpoint if checkpoint is not None else read_last_checkpoint(workdir), module, resumed)
    elif _launched_rank() == 0:
        start_afresh(workdir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed)
    return resumed


def resume_advice(workdir: str | os.PathLike) -> str:
    """What to do about a ``last.ckpt`` that cannot be resumed, in words."""
    return f"pass resume=False to start afresh in {workdir} (its checkpoints are deleted) or use another workdir"


def read_last_checkpoint(workdir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``last.ckpt``, read to resume it; a CheckpointError (a corrupt or truncated file,
    a folder) says that ``resume=False`` starts afresh."""
    path = checkpoint_path(workdir)
    try:
        return read_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(path, f"{error.problem}; cannot resume from it: {resume_advice(workdir)}") from error


def check_same_run(checkpoint: dict[str, Any], module: L.LightningModule, path: Path) -> None:
    """Resuming needs the model the checkpoint was written for: the module says what differs
    (:meth:`~pcfm.engine.module.PcfmModule.resume_problem`), and the error says it plainly."""
    problem = module.resume_problem(checkpoint["hyper_parameters"]) if hasattr(module, "resume_problem") else None
    if problem is not None:
        raise CheckpointError(path, f"{problem}; {resume_advice(path.parent.parent)}")


def start_afresh(workdir: str | os.PathLike, records: Sequence[str] = ()) -> None:
    """Delete what a new run in ``workdir`` must not keep of the run before: ``last.ckpt`` first
    (from then on nothing of the old run can be resumed), the ``last-vN.ckpt`` that earlier
    versions wrote beside it, ``logs/versions.json`` and ``records`` (paths in the workdir:
    ``checkpoints/best.ckpt``, ``metrics.json``, ...). The old CSV logs stay (no longer part of
    the run)."""
    workdir = Path(workdir)
    last = checkpoint_path(workdir)
    if last.is_dir():
        raise CheckpointError(last, "is a folder where pcfm keeps the run's checkpoint file; remove or rename it")
    last.unlink(missing_ok=True)
    checkpoints = workdir / CHECKPOINT_DIR
    stale = sorted(checkpoints.glob("last-v*.ckpt")) if checkpoints.is_dir() else []
    for path in [*stale, workdir / LOG_DIR / VERSIONS_FILE, *(workdir / record for record in records)]:
        if path.is_file():
            path.unlink()


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike, records: Sequence[str] = ()) -> Iterator[Path]:
    """Keep ``workdir`` to this run while the block runs, and clean up after killed runs.

    A second run on the folder raises :class:`WorkdirInUseError` at once, naming the first. The
    lock (``workdir/pcfm.lock``, :func:`pcfm.io.exclusive_lock`) is released when the block ends,
    by an exception too, and by the system when the process dies, so a killed run never leaves
    the folder locked. Holding it, the run removes the temporary files that killed writers left
    beside ``last.ckpt``, ``logs/versions.json`` and ``records`` (nobody else writes them now).
    The processes a DDP launcher starts for ranks other than 0 neither lock nor clean.
    """
    workdir = Path(workdir)
    if _launched_rank() != 0:
        yield workdir
        return
    lock = workdir / LOCK_FILE
    with contextlib.ExitStack() as holding:
        try:
            holding.enter_context(exclusive_lock(lock))
        except LockHeld as held:
            raise WorkdirInUseError(f"{workdir} is in use by another run: {describe_holder(held.holder)} (lock "
                                    f"file {lock}, released when that run ends or dies); wait for it or use "
                                    f"another workdir") from None
        for target in [checkpoint_path(workdir), workdir / LOG_DIR / VERSIONS_FILE, *(workdir / r for r in records)]:
            remove_leftover_temporaries(target, any_writer=True)
        yield workdir


def _launched_rank() -> int:
    """This process's rank as a launcher (Lightning's DDP, torchrun, SLURM) sets it in the
    environment, as Lightning reads it; 0 when none is set."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").strip().isdigit():
            return int(os.environ[key])
    return 0


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


def check_integer(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """An :class:`ArgumentError` naming ``name`` and ``value`` unless it is an integer >= ``minimum``
    (or None, when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}{' (or None)' if optional else ''}, got {value!r}")


def check_real(name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = True, optional: bool = False) -> None:
    """An :class:`ArgumentError` unless ``value`` is a finite number in the range from ``low`` to
    ``high`` (ends open or closed), or None when ``optional``."""
    if value is None and optional:
        return
    if math.isinf(high):
        words = f"{'>' if low_open else '>='} {low:g} and finite"
    else:
        words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ArgumentError(f"{name} must be a number {words}{' (or None)' if optional else ''}, got {value!r}")


def check_trainer_arguments(*, max_steps: Any, batch_points: Any, lr: Any, warmup_steps: Any, weight_decay: Any,
                            val_fraction: Any, n_events: Any, num_workers: Any, seed: Any, log_every_n_steps: Any,
                            checkpoint_every_n_steps: Any, val_every_n_steps: Any,
                            gradient_clip_val: Any = None) -> None:
    """Check the numeric arguments :func:`~pcfm.pretrain` and :func:`~pcfm.finetune` share, before
    any work: an :class:`ArgumentError` names the first bad one (``max_steps=-1`` would train
    forever, ``max_steps=0`` write no checkpoint, ``lr=nan`` diverge at the first step)."""
    check_integer("max_steps", max_steps, 1)
    check_integer("batch_points", batch_points, 1)
    check_real("lr", lr, low_open=True)
    check_integer("warmup_steps", warmup_steps, 0, optional=True)
    check_real("weight_decay", weight_decay)
    check_real("val_fraction", val_fraction, 0.0, 1.0)
    check_integer("n_events", n_events, 1)
    check_integer("num_workers", num_workers, 0)
    check_integer("seed", seed, 0)
    check_integer("log_every_n_steps", log_every_n_steps, 1)
    check_integer("checkpoint_every_n_steps", checkpoint_every_n_steps, 1)
    check_integer("val_every_n_steps", val_every_n_steps, 1, optional=True)
    check_real("gradient_clip_val", gradient_clip_val, optional=True)
