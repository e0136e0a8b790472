"""High-level entry points of pcfm: :func:`pretrain`.

``pcfm.pretrain()`` with no argument pretrains the tiny backbone by masked point modelling on
showers simulated on the fly (CaloChallenge dataset-2 geometry) and writes checkpoints and logs
to ``pcfm_runs/pretrain``; run it again and it resumes where it stopped. One run at a time works
in a workdir (a second one fails at once, naming the first), and ``resume=False`` deletes the
checkpoints of the run before, so that nothing of it can be resumed after a crash of the new one.

``pcfm.pretrain(..., init_from=checkpoint)`` starts a new run from the weights of another one
(adapting a model to a new geometry, say): every parameter and buffer of the checkpoint whose
name exists in the new model is copied, then training starts with a fresh optimiser, schedule
and step count. That differs from resuming, which continues the same run where it stopped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L

from pcfm.engine.data import PretrainDataModule
from pcfm.engine.training import (check_real, check_trainer_arguments, checkpoint_path, fit,
                                  hold_workdir, make_trainer, read_history)
from pcfm.nn import BACKBONE_PRESETS, BackboneConfig
from pcfm.tasks.pretrain import CheckpointError, PretrainModule, read_checkpoint

#: Entries never copied by ``init_from``: whether the module saw its training data. The new run
#: has new data, so every objective's ``on_data`` runs on it (the diffusion objective keeps the
#: copied normalisation and only fits its points-per-event model of the new geometries).
INIT_SKIPPED = ("data_statistics_fitted",)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns.

    Attributes:
        module: the trained :class:`~pcfm.tasks.pretrain.PretrainModule` (``.backbone`` is the encoder).
        checkpoint_path: ``workdir/checkpoints/last.ckpt``, reloadable with
            ``PretrainModule.load_from_checkpoint``.
        workdir: the run's folder.
        metrics: final values: ``train/loss`` and its terms at the last training step, and
            ``val/loss`` and its terms on the validation set at the final weights (when there
            is one).
        history: one dict per logged step (``step``, ``train/loss``, ``train/mpm/chamfer``, ...,
            ``val/...`` where validated), from the CSV logs of the run and its resumptions.
        initialised_from: with ``init_from``, what :func:`load_initial_weights` copied
            (``source``, ``copied``, ``not_in_model``, ``not_in_checkpoint``); else None.
    """

    module: PretrainModule
    checkpoint_path: Path
    workdir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    initialised_from: Optional[dict[str, Any]] = None


def backbone_config(model: str | BackboneConfig | Mapping[str, Any]) -> BackboneConfig:
    """A backbone config from a preset name, a config, or a dict ``{"preset": name, **overrides}``
    (no "preset": overrides of the default :class:`~pcfm.nn.BackboneConfig`)."""
    if isinstance(model, BackboneConfig):
        return model
    if isinstance(model, str):
        model = {"preset": model}
    overrides = dict(model)
    preset = overrides.pop("preset", None)
    if preset is None:
        return BackboneConfig.from_dict(overrides)
    if preset not in BACKBONE_PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; choose from {sorted(BACKBONE_PRESETS)}")
    base = BACKBONE_PRESETS[preset].to_dict()
    return BackboneConfig.from_dict({**base, **overrides})


def objective_weights(objective: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """``"mpm"``, ``"mpm+diffusion"``, ``["mpm", "diffusion"]`` or ``{"mpm": 1.0, "diffusion": 0.5}``
    as objective name -> loss weight."""
    if isinstance(objective, str):
        objective = [name.strip() for name in objective.split("+")]
    if not isinstance(objective, Mapping):
        objective = {name: 1.0 for name in objective}
    if not objective:
        raise ValueError("give at least one objective")
    return {name: float(weight) for name, weight in objective.items()}


def _init_source(init_from: str | os.PathLike | PretrainModule) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Name, hyperparameters and state dict (on the CPU) of an ``init_from`` checkpoint or module."""
    if isinstance(init_from, PretrainModule):
        state = {key: value.detach().cpu() for key, value in init_from.state_dict().items()}
        return "<in-memory PretrainModule>", dict(init_from.hparams), state
    checkpoint = read_checkpoint(init_from, map_location="cpu")
    return str(init_from), dict(checkpoint["hyper_parameters"]), checkpoint["state_dict"]


def _transform_kind(objective_config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The energy transform's kind and options without its fitted statistics (None if it has none)."""
    transform = objective_config.get("energy_transform")
    if not isinstance(transform, Mapping):
        return None
    return {key: value for key, value in transform.items() if key not in ("mean", "std")}


def load_initial_weights(module: PretrainModule, init_from: str | os.PathLike | PretrainModule) -> dict[str, Any]:
    """Copy into ``module`` every parameter and buffer of ``init_from`` that it also has.

    Entries only the checkpoint has (an objective not trained now) are left out, entries only
    the module has (a new objective's head) keep their fresh initialisation, and
    :data:`INIT_SKIPPED` is never copied. Returns what was done: ``source``, ``copied``,
    ``not_in_model`` and ``not_in_checkpoint`` (names).

    Raises:
        FileNotFoundError, CheckpointError: ``init_from`` is not a readable pcfm pretraining
            checkpoint.
        CheckpointError: naming the checkpoint and the first parameter whose shape differs
            (another backbone size or head), an energy transform of another kind (its copied
            statistics would mean something else), or no entry in common at all.
    """
    return _copy_weights(module, *_init_source(init_from))


def _copy_weights(module: PretrainModule, name: str, hparams: Mapping[str, Any],
                  state: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`load_initial_weights` from a source already read (:func:`_init_source`)."""
    for objective, config in (hparams.get("objectives") or {}).items():
        if objective in module.objectives:
            stored, wanted = _transform_kind(config), _transform_kind(module.objectives[objective].config())
            if stored is not None and wanted is not None and stored != wanted:
                raise CheckpointError(name, f"objective {objective!r} uses energy transform {stored}, but the "
                                            f"model to train uses {wanted}; its fitted statistics cannot be reused")
    target = module.state_dict()
    mismatched = [key for key, value in state.items()
                  if key in target and key not in INIT_SKIPPED and tuple(value.shape) != tuple(target[key].shape)]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(name, f"cannot initialise from it: parameter {key!r} has shape "
                                    f"{tuple(state[key].shape)} there but {tuple(target[key].shape)} in the model "
                                    f"to train{more}; use the checkpoint's backbone (model=None) and objective "
                                    f"options")
    copied = {key: value for key, value in state.items() if key in target and key not in INIT_SKIPPED}
    if not copied:
        raise CheckpointError(name, "cannot initialise from it: none of its parameters exists in the model to train")
    module.load_state_dict(copied, strict=False)
    return {"source": name, "copied": sorted(copied),
            "not_in_model": sorted(key for key in state if key not in target and key not in INIT_SKIPPED),
            "not_in_checkpoint": sorted(key for key in target if key not in state and key not in INIT_SKIPPED)}


def pretrain(objective: str | Sequence[str] | Mapping[str, float] = "mpm", data: Any = None, *,
             geometry: str | Sequence[str] | None = None,
             model: str | BackboneConfig | Mapping[str, Any] | None = None, max_steps: int = 1000,
             batch_points: int = 20_000, lr: float = 1e-3, warmup_steps: Optional[int] = None,
             weight_decay: float = 0.05, mask_ratio: Optional[float] = None,
             objective_options: Optional[Mapping[str, Mapping[str, Any]]] = None, n_events: int = 1024,
             val_fraction: float = 0.1, workdir: str | os.PathLike = "pcfm_runs/pretrain", resume: bool = True,
             accelerator: str = "auto", devices: Any = "auto", strategy: Any = "auto",
             precision: Optional[str] = None, num_workers: int = 0, seed: int = 0, log_every_n_steps: int = 10,
             checkpoint_every_n_steps: int = 100, val_every_n_steps: Optional[int] = None,
             gradient_clip_val: float = 1.0, callbacks: Optional[Sequence[L.Callback]] = None,
             progress: bool = True, deterministic: bool | str = False,
             data_options: Optional[Mapping[str, Any]] = None,
             init_from: str | os.PathLike | PretrainModule | None = None) -> PretrainResult:
    """Pretrain a backbone by masked point modelling, point diffusion or both, and save it.

    Args:
        objective: "mpm", "diffusion", "mpm+diffusion", a list of names, or name -> loss weight.
        data: training data: file paths / globs / folders in any format
            :func:`pcfm.data.open_dataset` reads, or a dataset (or list) of PyG ``Data`` point
            clouds; None simulates ``n_events`` events per ``geometry`` into memory.
        geometry: geometry name or list of names to simulate (default "calochallenge-ds2";
            "lartpc-768" for LArTPC events); with files, a name given here overrides the
            geometry ``open_dataset`` finds per file (default: keep it).
        model: backbone preset ("tiny", "small", "base"), a BackboneConfig, or a dict
            ``{"preset": "small", "depth": 8, ...}`` of overrides; None: the backbone of
            ``init_from``, else "tiny".
        max_steps: optimiser steps (>= 1); the learning-rate schedule ends here.
        batch_points: point budget of a batch (events are packed up to it; >= 1).
        lr: peak AdamW learning rate (> 0).
        warmup_steps: linear warm-up steps (>= 0; default ``min(100, max_steps // 10)``).
        weight_decay: AdamW weight decay on weight matrices (>= 0).
        mask_ratio: share of tokens masked by "mpm", in (0, 1) (default its own, 0.6).
        objective_options: objective name -> constructor keywords, e.g.
            ``{"mpm": {"decoder_depth": 1, "energy_weighted_chamfer": True}}``; with
            ``init_from``, they update the checkpoint's options of the objectives it holds.
        n_events: simulated events per geometry (``data=None`` only).
        val_fraction: share of events held out for validation, in [0, 1) (0: none).
        workdir: folder of checkpoints (``checkpoints/last.ckpt``) and CSV logs (``logs/``);
            one run at a time: it is locked while this run works there
            (:func:`~pcfm.engine.training.hold_workdir`).
        resume: continue from ``workdir/checkpoints/last.ckpt`` when it exists; False starts
            afresh: it first deletes the workdir's checkpoints (the old CSV logs stay, but are
            no longer part of the run), so that a crash of the new run cannot leave the old
            one to be resumed.
        accelerator, devices, strategy: as in Lightning ("cpu", "gpu", 2, "ddp", ...); DDP gets
            ``find_unused_parameters=True``.
        precision: None: bf16 mixed precision on a GPU, fp32 on CPU.
        num_workers: DataLoader worker processes.
        seed: seeds the weights, the simulation, the split, the batch order and every step's masks.
        log_every_n_steps: logging (and progress) interval.
        checkpoint_every_n_steps: ``last.ckpt`` interval (it is also written at the end).
        val_every_n_steps: validation interval (default ``checkpoint_every_n_steps``).
        gradient_clip_val: global gradient-norm clip (0: none).
        callbacks: more Lightning callbacks.
        progress: show progress: a bar on a terminal, else a line every 5 % of the run (logs, pipes).
        deterministic: Lightning's ``deterministic`` (True / "warn" make GPU runs reproducible, slower).
        data_options: more :class:`~pcfm.engine.data.PretrainDataModule` keywords
            (``particles``, ``energy_range``, ``theta_range``, ``lartpc_points``, ``max_events``,
            ``min_points``, ``dataset_options``).
        init_from: a pretraining checkpoint file (or :class:`PretrainModule`) whose weights
            start this new run: the backbone and the heads of the objectives it shares, copied
            by :func:`load_initial_weights`; the optimiser, schedule and step count start
            afresh. A run that resumes (``resume`` and ``workdir`` holds ``last.ckpt``)
            continues from its own checkpoint instead, but ``init_from`` must still be readable.

    Returns:
        :class:`PretrainResult`.

    Raises:
        ArgumentError: a numeric argument out of its range (a ValueError naming it and the
            value), before any work.
        WorkdirInUseError: another run works in ``workdir`` now (the message names its pid,
            host and start time).
        CheckpointError: ``last.ckpt`` is corrupt, or belongs to another model (with ``resume``;
            the message says that ``resume=False`` starts afresh); ``init_from`` is unreadable
            or does not fit the model (the message names it and the first parameter whose shape
            differs).
        TrainingDivergedError: a loss became NaN or infinite (the message names the step,
            the term and the batch).
    """
    check_trainer_arguments(max_steps=max_steps, batch_points=batch_points, lr=lr, warmup_steps=warmup_steps,
                            weight_decay=weight_decay, val_fraction=val_fraction, n_events=n_events,
                            num_workers=num_workers, seed=seed, log_every_n_steps=log_every_n_steps,
                            checkpoint_every_n_steps=checkpoint_every_n_steps, val_every_n_steps=val_every_n_steps,
                            gradient_clip_val=gradient_clip_val)
    check_real("mask_ratio", mask_ratio, 0.0, 1.0, low_open=True, optional=True)
    weights = objective_weights(objective)
    unknown = set(objective_options or {}) - set(weights)
    if unknown:
        raise ValueError(f"objective_options given for {sorted(unknown)}, which are not trained ({sorted(weights)})")
    if mask_ratio is not None and "mpm" not in weights:
        raise ValueError("mask_ratio applies to the 'mpm' objective, which is not trained")
    workdir = Path(workdir)
    with hold_workdir(workdir):
        source = None if init_from is None else _init_source(init_from)
        source_objectives = {} if source is None else dict(source[1].get("objectives") or {})
        if model is None:
            model = "tiny" if source is None else source[1]["backbone"]
        options = {name: {**dict(source_objectives.get(name) or {}), **dict((objective_options or {}).get(name, {}))}
                   for name in weights}
        if mask_ratio is not None:
            options["mpm"]["mask_ratio"] = mask_ratio
        if warmup_steps is None:
            warmup_steps = min(100, max_steps // 10)

        L.seed_everything(seed, workers=True, verbose=False)
        module = PretrainModule(backbone_config(model), objectives=options, weights=weights, lr=lr,
                                weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps, seed=seed)
        initialised = None if source is None else _copy_weights(module, *source)
        datamodule = PretrainDataModule(data, geometry=geometry, n_events=n_events, val_fraction=val_fraction,
                                        batch_points=batch_points, num_workers=num_workers, seed=seed,
                                        **dict(data_options or {}))
        trainer = make_trainer(workdir, max_steps=max_steps, accelerator=accelerator, devices=devices,
                               strategy=strategy, precision=precision, gradient_clip_val=gradient_clip_val,
                               log_every_n_steps=log_every_n_steps, checkpoint_every_n_steps=checkpoint_every_n_steps,
                               val_every_n_steps=val_every_n_steps, callbacks=callbacks, progress=progress,
                               deterministic=deterministic, progress_label="pretrain")
        fit(trainer, module, datamodule, resume=resume)
        last = checkpoint_path(workdir)

        history = read_history(workdir)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/")}
        if val_fraction > 0:
            for results in trainer.validate(module, datamodule=datamodule, verbose=False):
                metrics.update({key: float(value) for key, value in results.items()})
        return PretrainResult(module=module, checkpoint_path=last, workdir=workdir, metrics=metrics, history=history,
                              initialised_from=initialised)
