"""Fine-tuning a (pre)trained backbone on a labelled downstream task.

:class:`FinetuneModule` puts a small head on a :class:`~pcfm.nn.Backbone` for one of
:data:`TASKS`:

- ``"classification"``: the event class ``y`` (an index into
  :data:`pcfm.data.PARTICLE_CLASSES`) from the pooled event embedding, by cross-entropy;
- ``"regression"``: event quantities (:data:`REGRESSION_TARGETS`: log of the incident energy,
  the polar angle), by a mean squared error on standardised targets, as a linear calibration
  on the event's log visible energy (the start of every calorimeter energy measurement; its
  slope is fitted on the training events by least squares before training) plus a correction
  that the head computes from the pooled embedding and the visible energy (its output layer
  starts at zero, so training starts from the calibration). The targets are hidden from the
  backbone's event conditioning (:func:`~pcfm.nn.hide_condition`), which would otherwise read them;
- ``"segmentation"``: the per-point ``semantic`` class (LArTPC) from the per-point features, by a
  cross-entropy whose class weights (inverse training-set frequencies) counter the imbalance.

and trains it in one of :data:`MODES`: ``"linear"`` (frozen backbone, head only: a linear
probe of the representation), ``"full"`` (everything at ``lr``) or ``"layerwise"`` (backbone at
``backbone_lr_scale * lr``, head at ``lr``), with the pretraining schedule
(:func:`~pcfm.tasks.pretrain.warmup_cosine`) and NaN guard (:func:`~pcfm.tasks.pretrain.check_finite`).

The metrics of a task on held-out predictions are :func:`task_metrics`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from pcfm.data import PARTICLE_CLASSES, PARTICLE_NAMES, SEMANTIC_CLASSES
from pcfm.data.augment import augment_by_symmetry
from pcfm.nn import Backbone, BackboneConfig, hide_condition
from pcfm.tasks.objective import load_missing_as_zeros
from pcfm.tasks.pretrain import CHECKPOINT_MARKER, check_finite, warmup_cosine

TASKS = ("classification", "regression", "segmentation")
MODES = ("linear", "full", "layerwise")
#: Regression targets, as event fields: ``incident_energy`` is predicted as log(E / 1 MeV).
REGRESSION_TARGETS = ("incident_energy", "theta")
#: Names of the classes of each classification task.
CLASS_NAMES = {"classification": tuple(PARTICLE_NAMES[pdg] for pdg in PARTICLE_CLASSES),
               "segmentation": SEMANTIC_CLASSES}


def regression_values(batch, targets: Sequence[str]) -> Tensor:
    """(B, len(targets)) regression targets of a batch: log(incident energy / MeV), theta (rad)."""
    columns = [torch.log(batch.incident_energy) if name == "incident_energy" else batch[name] for name in targets]
    return torch.stack([column.float().reshape(-1) for column in columns], 1)


def log_visible_energy(batch) -> Tensor:
    """(B, 1) log of each event's summed point energy (MeV, floored at 1 keV)."""
    total = torch.zeros(int(batch.num_graphs), device=batch.energy.device).index_add(
        0, batch.batch, batch.energy.float())
    return torch.log(total.clamp_min(1e-3))[:, None]


def mlp_head(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """The head of every task: LayerNorm, one hidden GELU layer, a linear read-out."""
    return nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, hidden), nn.GELU(),
                         nn.Linear(hidden, out_features))


class FinetuneModule(L.LightningModule):
    """Backbone + task head, trained in one of :data:`MODES` (see the module docstring).

    Args:
        backbone: a :class:`~pcfm.nn.BackboneConfig` or its dict.
        task: one of :data:`TASKS`.
        mode: one of :data:`MODES`.
        targets: regression targets (subset of :data:`REGRESSION_TARGETS`).
        target_mean, target_std: training-set mean and spread of each regression target (and,
            last, of the log visible energy), to standardise them; default 0 and 1.
        visible_energy_slope: per regression target, the starting slope of the standardised
            target on the standardised log visible energy (the calibration path); default 0.
        class_weights: cross-entropy weight per class (segmentation: from the training set).
        head_hidden: hidden width of the head (default the backbone width).
        lr: head learning rate (and the backbone's in "full" mode).
        backbone_lr_scale: backbone learning rate / ``lr`` in "layerwise" mode.
        weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: AdamW and the schedule.
        class_names: the classes of ``y`` (classification; default the particle classes
            :data:`CLASS_NAMES`, e.g. ``("photon", "pi0")`` for another label set).
        augment: show each training event in a random symmetry of its detector
            (:func:`~pcfm.data.augment.augment_by_symmetry`): without it a network memorises a
            few hundred labelled events instead of learning from them.
    """

    def __init__(self, backbone: BackboneConfig | Mapping[str, Any] | None = None, task: str = "classification",
                 mode: str = "full", targets: Sequence[str] = ("incident_energy",),
                 target_mean: Optional[Sequence[float]] = None, target_std: Optional[Sequence[float]] = None,
                 visible_energy_slope: Optional[Sequence[float]] = None,
                 class_weights: Optional[Sequence[float]] = None, head_hidden: Optional[int] = None,
                 lr: float = 1e-3, backbone_lr_scale: float = 0.1, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10, max_steps: int = 1000,
                 min_lr_ratio: float = 0.01, augment: bool = True, augment_seed: int = 0,
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
        targets = tuple(targets)
        if task == "regression" and (not targets or set(targets) - set(REGRESSION_TARGETS)):
            raise ValueError(f"regression targets must be among {list(REGRESSION_TARGETS)}, got {list(targets)}")
        config = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig.from_dict(
            dict(backbone or BackboneConfig().to_dict()))
        self.backbone = Backbone(config)
        width, hidden = config.width, head_hidden or config.width
        if task == "regression":
            n_stats = len(targets) + 1
            self.register_buffer("target_mean", torch.tensor(list(target_mean or [0.0] * n_stats), dtype=torch.float32))
            self.register_buffer("target_std", torch.tensor(list(target_std or [1.0] * n_stats), dtype=torch.float32))
            self.head = mlp_head(width + 1, hidden, len(targets))
            nn.init.zeros_(self.head[-1].weight)  # start from the calibration alone
            nn.init.zeros_(self.head[-1].bias)
            self.calibration = nn.Linear(1, len(targets))
            with torch.no_grad():
                self.calibration.weight.copy_(torch.tensor(list(visible_energy_slope or [0.0] * len(targets)),
                                                           dtype=torch.float32)[:, None])
                self.calibration.bias.zero_()
            # a regression checkpoint from before the calibration path predicts as it did
            load_missing_as_zeros(self, ("calibration.weight", "calibration.bias"))
        else:
            class_names = tuple(class_names or CLASS_NAMES[task])
            n_classes = len(class_names)
            self.head = mlp_head(width, hidden, n_classes)
            weights = torch.ones(n_classes) if class_weights is None else torch.tensor(list(class_weights))
            self.register_buffer("class_weights", weights.float())
        if mode == "linear":
            self.backbone.requires_grad_(False)
        self.save_hyperparameters({
            "backbone": config.to_dict(), "task": task, "mode": mode, "targets": list(targets),
            "target_mean": None if target_mean is None else [float(v) for v in target_mean],
            "target_std": None if target_std is None else [float(v) for v in target_std],
            "visible_energy_slope": None if visible_energy_slope is None else [float(v) for v in visible_energy_slope],
            "class_weights": None if class_weights is None else [float(v) for v in class_weights],
            "head_hidden": hidden, "lr": float(lr), "backbone_lr_scale": float(backbone_lr_scale),
            "weight_decay": float(weight_decay), "betas": [float(b) for b in betas],
            "warmup_steps": int(warmup_steps), "max_steps": int(max_steps), "min_lr_ratio": float(min_lr_ratio),
            "augment": bool(augment), "augment_seed": int(augment_seed),
            "class_names": None if task == "regression" or class_names is None else list(class_names),
        })

    # ------------------------------------------------------------------ forward and loss
    def forward(self, batch) -> Tensor:
        """Class logits (B, K), standardised regression outputs (B, T) or point logits (N, K)."""
        task = self.hparams.task
        # A regression target in the conditioning would be read, not predicted: hide it.
        seen = hide_condition(batch, self.hparams.targets) if task == "regression" else batch
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hparams.mode != "linear"):
            output = self.backbone(seen, points=task == "segmentation")
        if task == "classification":
            return self.head(output.pooled)
        if task == "segmentation":
            return self.head(output.point_features)
        visible = ((log_visible_energy(batch) - self.target_mean[-1]) / self.target_std[-1]).to(output.pooled.dtype)
        return self.calibration(visible) + self.head(torch.cat([output.pooled, visible], 1))

    def labels(self, batch) -> Tensor:
        """The targets of a batch: class indices, standardised regression values or point classes."""
        task = self.hparams.task
        if task == "classification":
            return batch.y.reshape(-1)
        if task == "segmentation":
            return batch.semantic
        values = regression_values(batch, self.hparams.targets)
        return (values - self.target_mean[:-1]) / self.target_std[:-1]

    def loss(self, batch) -> Tensor:
        outputs, labels = self(batch).float(), self.labels(batch)
        if self.hparams.task == "regression":
            return nn.functional.mse_loss(outputs, labels)
        return nn.functional.cross_entropy(outputs, labels, weight=self.class_weights, ignore_index=-1)

    def predict(self, batch) -> dict[str, Tensor]:
        """Predictions and truths of a batch in physical units (classes; MeV and radians)."""
        outputs = self(batch).float()
        if self.hparams.task != "regression":
            return {"prediction": outputs.argmax(1), "truth": self.labels(batch)}
        values = outputs * self.target_std[:-1] + self.target_mean[:-1]
        physical = lambda v: torch.stack([v[:, i].exp() if name == "incident_energy" else v[:, i]  # noqa: E731
                                          for i, name in enumerate(self.hparams.targets)], 1)
        return {"prediction": physical(values), "truth": physical(regression_values(batch, self.hparams.targets))}

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.hparams.get("augment", False):  # a checkpoint from before the option trained without
            # drawn from (seed, step), not the global RNG, so that a resumed run sees the same symmetries
            generator = torch.Generator().manual_seed(
                1_000_003 * (int(self.global_step) + 1) + int(self.hparams.get("augment_seed", 0)))
            batch = augment_by_symmetry(batch, generator)
        loss = self.loss(batch)
        check_finite({self.hparams.task: {"loss": loss}}, batch, self.global_step)
        size = int(batch.num_graphs)
        self.log("train/loss", loss.detach(), batch_size=size, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), batch_size=int(batch.num_graphs), prog_bar=True, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        return {key: value.detach().cpu() for key, value in self.predict(batch).items()}

    def configure_optimizers(self):
        """AdamW over the head (``lr``) and, unless linear, the backbone (``lr`` or scaled);
        no weight decay on 1-D parameters and embeddings. Groups: head first."""
        hp = self.hparams
        embeddings = {id(p) for module in self.modules() if isinstance(module, nn.Embedding)
                      for p in module.parameters()}
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        scale = hp.backbone_lr_scale if hp.mode == "layerwise" else 1.0
        groups = []
        for name, is_backbone, lr in (("head", False, hp.lr), ("backbone", True, hp.lr * scale)):
            params = [p for p in self.parameters() if p.requires_grad and (id(p) in backbone_ids) == is_backbone]
            decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
            rest = [p for p in params if not (p.ndim >= 2 and id(p) not in embeddings)]
            groups += [{"name": name, "params": decay, "lr": lr, "weight_decay": hp.weight_decay},
                       {"name": f"{name}/no_decay", "params": rest, "lr": lr, "weight_decay": 0.0}]
        groups = [group for group in groups if group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, hp.max_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from pcfm import __version__

        checkpoint[CHECKPOINT_MARKER] = {"version": __version__, "kind": "finetune"}


def backbone_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights from a module state dict (its ``backbone.`` entries, prefix removed)."""
    prefix = "backbone."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


# ---------------------------------------------------------------------- metrics
def f1_scores(prediction: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class F1 = 2 TP / (2 TP + FP + FN); NaN for a class absent from truth and prediction."""
    tp = np.bincount(truth[prediction == truth], minlength=n_classes).astype(float)
    predicted = np.bincount(prediction, minlength=n_classes)
    actual = np.bincount(truth, minlength=n_classes)
    denominator = predicted + actual
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def task_metrics(task: str, prediction: np.ndarray, truth: np.ndarray,
                 targets: Sequence[str] = ("incident_energy",),
                 class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Held-out metrics of a task, as a flat dict of floats.

    classification / segmentation: ``accuracy``, ``f1/<class>`` for classes in the truth, and
    ``mean_f1`` over them (points with class -1 are left out; ``class_names`` name the classes,
    default :data:`CLASS_NAMES`). regression, per target:
    ``incident_energy/resolution`` = std((E_pred - E) / E) and ``.../bias`` = mean((E_pred - E) / E);
    ``theta/resolution`` = std(theta_pred - theta) and ``theta/bias`` = mean of it (radians).
    """
    if task == "regression":
        metrics = {}
        for i, name in enumerate(targets):
            error = prediction[:, i] - truth[:, i]
            if name == "incident_energy":
                error = error / truth[:, i]
            metrics[f"{name}/resolution"] = float(np.std(error))
            metrics[f"{name}/bias"] = float(np.mean(error))
        return metrics
    names = tuple(class_names or CLASS_NAMES[task])
    keep = truth >= 0
    prediction, truth = prediction[keep], truth[keep]
    scores = f1_scores(prediction, truth, len(names))
    present = np.bincount(truth, minlength=len(names)) > 0
    metrics = {"accuracy": float(np.mean(prediction == truth)) if truth.size else math.nan}
    metrics.update({f"f1/{names[c]}": float(scores[c]) for c in np.flatnonzero(present)})
    metrics["mean_f1"] = float(np.mean(scores[present])) if present.any() else math.nan
    return metrics
