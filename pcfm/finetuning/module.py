"""Fine-tuning a (pre)trained backbone on a labelled downstream task.

:class:`FinetuneModule` is a :class:`~pcfm.nn.Backbone` plus a
:class:`~pcfm.finetuning.task.DownstreamTask` (its head, loss and metrics: see
:data:`~pcfm.finetuning.task.TASKS`), trained in one of :data:`MODES`: ``"linear"`` (frozen
backbone, head only: a linear probe of the representation), ``"full"`` (everything at ``lr``)
or ``"layerwise"`` (backbone at ``backbone_lr_scale * lr``, head at ``lr``), with the pretraining
schedule and NaN guard of :class:`~pcfm.engine.module.PcfmModule`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from pcfm.data.augment import augment_by_symmetry
from pcfm.finetuning.task import HEAD_NORMS, TASKS, as_float_list, make_task
from pcfm.nn import Backbone, BackboneConfig, hide_condition
from pcfm.engine.module import PcfmModule, check_finite

MODES = ("linear", "full", "layerwise")
#: State-dict entries of checkpoints written before the task owned its head (pcfm 0.1) -> now.
RENAMED_ENTRIES = {"head.": "task.head.", "calibration.": "task.calibration.", "class_weights": "task.weights",
                   "target_mean": "task.mean", "target_std": "task.std"}


def _rename_old_entries(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        for old, new in RENAMED_ENTRIES.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                state_dict[prefix + new + name[len(old):]] = state_dict.pop(key)
                break


class FinetuneModule(PcfmModule):
    """Backbone + task, trained in one of :data:`MODES` (see the module docstring).

    Args:
        backbone: a :class:`~pcfm.nn.BackboneConfig` or its dict.
        task: a name in :data:`~pcfm.finetuning.task.TASKS`.
        mode: one of :data:`MODES`.
        targets, target_mean, target_std, visible_energy_slope: the regression task's options
            (:class:`~pcfm.finetuning.regression.Regression`).
        class_weights, class_names: the classification / segmentation tasks' options.
        head_hidden: hidden width of the head (default the backbone width).
        lr: head learning rate (and the backbone's in "full" mode).
        backbone_lr_scale: backbone learning rate / ``lr`` in "layerwise" mode.
        weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: AdamW and the schedule.
        augment: show each training event in a random symmetry of its detector
            (:func:`~pcfm.data.augment.augment_by_symmetry`): without it a network memorises a
            few hundred labelled events instead of learning from them.
        augment_seed: with the step, seeds the symmetries (a resumed run sees the same ones).
        task_options: options of a task other than the built-in ones (its ``OPTIONS``).
        head_norm: "layer" or "batch", the first layer of an event-level head
            (:func:`~pcfm.finetuning.task.mlp_head`); "layer" here, so that checkpoints written
            before the choice existed rebuild as they were; :func:`pcfm.finetune` passes "batch".
    """

    checkpoint_kind = "finetune"

    def __init__(self, backbone: BackboneConfig | Mapping[str, Any] | None = None, task: str = "classification",
                 mode: str = "full", targets: Sequence[str] = ("incident_energy",),
                 target_mean: Optional[Sequence[float]] = None, target_std: Optional[Sequence[float]] = None,
                 visible_energy_slope: Optional[Sequence[float]] = None,
                 class_weights: Optional[Sequence[float]] = None, head_hidden: Optional[int] = None,
                 lr: float = 1e-3, backbone_lr_scale: float = 0.1, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10, max_steps: int = 1000,
                 min_lr_ratio: float = 0.01, augment: bool = True, augment_seed: int = 0,
                 class_names: Optional[Sequence[str]] = None, task_options: Optional[Mapping[str, Any]] = None,
                 head_norm: str = "layer"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
        config = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig.from_dict(
            dict(backbone or BackboneConfig().to_dict()))
        self.backbone = Backbone(config)
        hidden = head_hidden or config.width
        self.task = make_task(task, targets=tuple(targets), target_mean=target_mean, target_std=target_std,
                              visible_energy_slope=visible_energy_slope, class_weights=class_weights,
                              class_names=class_names, **dict(task_options or {}))
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"unknown head_norm {head_norm!r}; choose from {list(HEAD_NORMS)}")
        self.task.head_norm = head_norm
        self.task.build(config.width, hidden)
        if mode == "linear":
            self.backbone.requires_grad_(False)
        self._register_load_state_dict_pre_hook(_rename_old_entries)
        self.save_hyperparameters({
            "backbone": config.to_dict(), "task": task, "mode": mode, "targets": list(targets),
            "target_mean": as_float_list(target_mean), "target_std": as_float_list(target_std),
            "visible_energy_slope": as_float_list(visible_energy_slope),
            "class_weights": as_float_list(class_weights),
            "head_hidden": hidden, "lr": float(lr), "backbone_lr_scale": float(backbone_lr_scale),
            "weight_decay": float(weight_decay), "betas": [float(b) for b in betas],
            "warmup_steps": int(warmup_steps), "max_steps": int(max_steps), "min_lr_ratio": float(min_lr_ratio),
            "augment": bool(augment), "augment_seed": int(augment_seed),
            "class_names": None if class_names is None or "class_names" not in self.task.OPTIONS else list(class_names),
            **({"task_options": dict(task_options)} if task_options else {}),
            "head_norm": head_norm,
        })

    # ------------------------------------------------------------------ forward and loss
    def forward(self, batch) -> Tensor:
        """The task's outputs: class logits (B, K), standardised regression values (B, T), point
        logits (N, K), ..."""
        hidden = self.task.hidden_conditions()
        # A regression target in the conditioning would be read, not predicted: hide it.
        seen = hide_condition(batch, hidden) if hidden else batch
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hparams.mode != "linear"):
            output = self.backbone(seen, points=self.task.per_point)
        return self.task(output, batch)

    def labels(self, batch) -> Tensor:
        """The task's targets of a batch."""
        return self.task.labels(batch)

    def loss(self, batch) -> Tensor:
        return self.task.loss(self(batch).float(), self.task.labels(batch))

    def predict(self, batch) -> dict[str, Tensor]:
        """Predictions and truths of a batch in physical units (classes; MeV and radians)."""
        return self.task.predict(self(batch).float(), batch)

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

    def parameter_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """The head (every parameter outside the backbone) at ``lr``, then, unless linear, the
        backbone at ``lr`` ("full") or ``backbone_lr_scale * lr`` ("layerwise")."""
        hp = self.hparams
        in_backbone = {id(p) for p in self.backbone.parameters()}
        scale = hp.backbone_lr_scale if hp.mode == "layerwise" else 1.0
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [("head", [p for p in trainable if id(p) not in in_backbone], hp.lr),
                ("backbone", [p for p in trainable if id(p) in in_backbone], hp.lr * scale)]


def backbone_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights from a module state dict (its ``backbone.`` entries, prefix removed)."""
    prefix = "backbone."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
