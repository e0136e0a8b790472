"""The Lightning module of pretraining: one backbone, one or more weighted objectives.

:class:`PretrainModule` holds a :class:`~pcfm.nn.Backbone` and an ``nn.ModuleDict`` of
:class:`~pcfm.tasks.objective.Objective` (masked point modelling, point diffusion, or both on
a shared encoder with separate heads) and minimises ``sum_k weight_k * loss_k`` with AdamW and a
per-step schedule: linear warm-up to ``lr`` over ``warmup_steps``, then a cosine decay to
``min_lr_ratio * lr`` at ``max_steps``. Gradient clipping is the Trainer's
(:func:`pcfm.engine.training.make_trainer`).

Its hyperparameters are plain data (the backbone config as a dict, each objective's config),
so ``PretrainModule.load_from_checkpoint(path)`` rebuilds the whole model from the file alone;
a file that is not a readable pcfm checkpoint gives a :class:`CheckpointError` naming it.

Reproducibility: before every training step torch's random generators are seeded from
``(seed, global step, rank)``, so the masks and noise of a step do not depend on what ran
before it, and a run resumed from a checkpoint continues exactly as an uninterrupted one.

A non-finite loss stops training with a :class:`TrainingDivergedError` naming the step, the
objective and term, and the batch (events, points, dataset indices, events with non-finite
inputs), instead of letting NaNs spread through the weights.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from pcfm.engine.checkpoints import CHECKPOINT_MARKER, CheckpointError, read_checkpoint
from pcfm.engine.module import PcfmModule, TrainingDivergedError, check_finite, describe_batch, warmup_cosine
from pcfm.errors import PcfmError
from pcfm.nn import Backbone, BackboneConfig
from pcfm.tasks.objective import get_objective_class

# The shared training plumbing lives in pcfm.engine; these names stay importable from here.
__all__ = ["PretrainModule", "CHECKPOINT_MARKER", "CheckpointError", "read_checkpoint", "TrainingDivergedError",
           "check_finite", "describe_batch", "warmup_cosine"]

#: Seeds of consecutive steps and ranks are this far apart (a prime, so they do not collide).
_STEP_SEED_STRIDE = 1_000_003


def _objective_weights(names, weights: Optional[Mapping[str, float]]) -> dict[str, float]:
    weights = dict(weights or {})
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"weights given for objective(s) {sorted(unknown)} that are not trained: {sorted(names)}")
    return {name: float(weights.get(name, 1.0)) for name in names}


class PretrainModule(PcfmModule):
    """Backbone + weighted pretraining objectives (see the module docstring).

    Args:
        backbone: a :class:`~pcfm.nn.BackboneConfig` or its :meth:`~pcfm.nn.BackboneConfig.to_dict`.
        objectives: objective name -> constructor keywords (``{"mpm": {"mask_ratio": 0.6}}``),
            a list of names for the defaults, or one name.
        weights: objective name -> weight of its loss (default 1 each).
        lr: peak learning rate of AdamW. weight_decay: AdamW weight decay (not applied to biases,
            norms, embeddings and other 1-D parameters).
        betas: AdamW betas.
        warmup_steps: optimiser steps of linear warm-up.
        max_steps: step at which the cosine schedule reaches ``min_lr_ratio * lr``.
        min_lr_ratio: final learning rate as a share of ``lr``.
        seed: base of the per-step seeds.
    """

    checkpoint_kind = "pretrain"
    embeddings_last = True  # the optimiser state of 0.1 checkpoints follows this order

    def __init__(self, backbone: BackboneConfig | Mapping[str, Any] | None = None,
                 objectives: Mapping[str, Mapping[str, Any]] | list[str] | str = "mpm",
                 weights: Optional[Mapping[str, float]] = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100, max_steps: int = 1000,
                 min_lr_ratio: float = 0.01, seed: int = 0):
        super().__init__()
        if backbone is None:
            backbone = BackboneConfig()
        config = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig.from_dict(dict(backbone))
        if isinstance(objectives, str):
            objectives = [objectives]
        if not isinstance(objectives, Mapping):
            objectives = {name: {} for name in objectives}
        if not objectives:
            raise ValueError("give at least one objective")
        self.backbone = Backbone(config)
        self.objectives = nn.ModuleDict({
            name: get_objective_class(name).from_config(dict(options or {}), config)
            for name, options in objectives.items()})
        self.weights = _objective_weights(list(self.objectives), weights)
        # Whether the objectives have seen the training data (Objective.on_data); checkpointed.
        self.register_buffer("data_statistics_fitted", torch.tensor(False))
        self.save_hyperparameters({
            "backbone": config.to_dict(),
            "objectives": {name: objective.config() for name, objective in self.objectives.items()},
            "weights": self.weights, "lr": float(lr), "weight_decay": float(weight_decay),
            "betas": [float(b) for b in betas], "warmup_steps": int(warmup_steps), "max_steps": int(max_steps),
            "min_lr_ratio": float(min_lr_ratio), "seed": int(seed),
        })

    # ------------------------------------------------------------------ data statistics
    def fit_data_statistics(self, dataset) -> None:
        """Run every objective's :meth:`~pcfm.tasks.objective.Objective.on_data` on the training
        dataset, once; their configs are stored again (on_data may change them)."""
        for name, objective in self.objectives.items():
            objective.on_data(dataset)
            self.hparams["objectives"][name] = objective.config()
        self.data_statistics_fitted.fill_(True)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(datamodule, "train_dataset", None)
        if stage == "fit" and dataset is not None and not bool(self.data_statistics_fitted):
            self.fit_data_statistics(dataset)

    # ------------------------------------------------------------------ steps
    def losses(self, batch) -> dict[str, dict[str, Tensor]]:
        """Each objective's loss terms on ``batch`` (``{"mpm": {"loss": ..., "chamfer": ...}}``)."""
        return {name: objective.loss(self.backbone, batch) for name, objective in self.objectives.items()}

    def _total(self, terms: dict[str, dict[str, Tensor]]) -> Tensor:
        return sum(self.weights[name] * values["loss"] for name, values in terms.items())

    def _log_terms(self, stage: str, total: Tensor, terms: dict[str, dict[str, Tensor]], batch) -> None:
        size = int(batch.num_graphs)
        sync = stage == "val"
        self.log(f"{stage}/loss", total.detach(), batch_size=size, prog_bar=True, sync_dist=sync)
        for name, values in terms.items():
            for key, value in values.items():
                self.log(f"{stage}/{name}/{key}", value.detach().float(), batch_size=size, sync_dist=sync)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed = self.hparams.seed + _STEP_SEED_STRIDE * (self.global_step * self.trainer.world_size
                                                       + self.trainer.global_rank + 1)
        torch.manual_seed(seed % 2**63)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        check_finite(terms, batch, self.global_step)
        total = self._total(terms)
        self._log_terms("train", total, terms, batch)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=int(batch.num_graphs))
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.hparams.seed + batch_idx)  # the same masks every validation
            terms = self.losses(batch)
        self._log_terms("val", self._total(terms), terms, batch)

    # ------------------------------------------------------------------ checkpoints
    def resume_problem(self, stored: dict[str, Any]) -> Optional[str]:
        """Another backbone, or other objectives, than the checkpoint's."""
        problem = super().resume_problem(stored)
        if problem is None and sorted(stored.get("objectives", {})) != sorted(self.hparams.get("objectives", {})):
            problem = (f"trains objectives {sorted(stored.get('objectives', {}))}, not "
                       f"{sorted(self.hparams.get('objectives', {}))}")
        return problem

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = "cpu",
                             strict: bool = True, **overrides) -> "PretrainModule":
        """Rebuild a module from a checkpoint alone (``overrides`` replace stored hyperparameters).

        Raises FileNotFoundError or :class:`CheckpointError` naming the file (see :func:`read_checkpoint`).
        """
        checkpoint = read_checkpoint(checkpoint_path, map_location)
        try:
            module = cls(**{**checkpoint["hyper_parameters"], **overrides})
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
        except (ValueError, RuntimeError, TypeError, KeyError, PcfmError) as exc:
            raise CheckpointError(checkpoint_path, f"cannot rebuild the model it describes: {exc}") from exc
        return module


