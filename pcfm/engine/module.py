"""What every pcfm LightningModule shares: the optimiser, the schedule and the checkpoint marker.

:class:`PcfmModule` is the base of :class:`~pcfm.tasks.pretrain.PretrainModule` and
:class:`~pcfm.finetuning.FinetuneModule`: AdamW over named parameter groups (each split into a
weight-decayed part and a part without decay: biases, norms, embeddings and other 1-D
parameters), a per-step linear warm-up then cosine decay (:func:`warmup_cosine`), and the pcfm
marker in every checkpoint it writes (:func:`~pcfm.engine.checkpoints.read_checkpoint` checks it).
A subclass says which parameters train at which rate (:meth:`PcfmModule.parameter_groups`) and
what kind of checkpoint it writes.

A non-finite loss stops training with a :class:`TrainingDivergedError` (:func:`check_finite`)
naming the step, the term and the batch, instead of letting NaNs spread through the weights.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import lightning as L
import torch
from torch import Tensor, nn

from pcfm.engine.checkpoints import CHECKPOINT_MARKER
from pcfm.errors import PcfmError


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor at optimiser step ``step``: linear warm-up then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PcfmModule(L.LightningModule):
    """Base of the pcfm modules (module docstring). Its hyper-parameters must hold ``lr``,
    ``weight_decay``, ``betas``, ``warmup_steps``, ``max_steps`` and ``min_lr_ratio``."""

    #: ``kind`` of the checkpoint marker ("pretrain", "finetune").
    checkpoint_kind: ClassVar[str]
    #: Put embedding tables after the 1-D parameters in each no-decay group (the order of
    #: pretraining checkpoints of pcfm 0.1, whose optimiser state follows it).
    embeddings_last: ClassVar[bool] = False

    def parameter_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """``(name, parameters, learning rate)`` of each group; default: every trainable
        parameter at ``lr``."""
        return [("all", [p for p in self.parameters() if p.requires_grad], self.hparams.lr)]

    def resume_problem(self, stored: dict[str, Any]) -> Optional[str]:
        """Why a checkpoint with hyper-parameters ``stored`` cannot be resumed by this module
        (another backbone, ...), or None."""
        if stored.get("backbone") != self.hparams.get("backbone"):
            return "was written for another backbone configuration than the one asked for"
        return None

    def configure_optimizers(self):
        hp = self.hparams
        embeddings = {id(p) for module in self.modules() if isinstance(module, nn.Embedding)
                      for p in module.parameters()}
        groups = []
        for name, params, lr in self.parameter_groups():
            decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
            if self.embeddings_last:
                rest = [p for p in params if p.ndim < 2] + [p for p in params if p.ndim >= 2 and id(p) in embeddings]
            else:
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

        checkpoint[CHECKPOINT_MARKER] = {"version": __version__, "kind": self.checkpoint_kind}


class TrainingDivergedError(PcfmError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the step, the term and the batch."""


def check_finite(terms: dict[str, dict[str, Tensor]], batch, step: int) -> None:
    """Raise :class:`TrainingDivergedError` when any loss term is NaN or infinite.

    One host synchronisation per step: all terms are checked at once.
    """
    flat = [(name, key, value) for name, values in terms.items() for key, value in values.items()]
    finite = torch.stack([torch.isfinite(value.detach()).all() for _, _, value in flat])
    if bool(finite.all()):
        return
    name, key, value = next((n, k, v) for (n, k, v), ok in zip(flat, finite.tolist()) if not ok)
    raise TrainingDivergedError(f"training diverged at step {step}: objective {name!r} term {key!r} is "
                                f"{value.detach().float().sum().item()} on {describe_batch(batch)}")


def describe_batch(batch) -> str:
    """Events, points, dataset indices and events with non-finite inputs of a batch, in words."""
    num_events = int(batch.num_graphs)
    words = f"a batch of {num_events} events and {batch.num_nodes} points"
    ids = getattr(batch, "event_id", None)
    if ids is not None:
        words += f" (dataset events {ids.tolist()})"
    bad_point = ~torch.isfinite(batch.pos).all(1) | ~torch.isfinite(batch.x).all(1)
    if bad_point.any():
        bad_events = torch.unique(batch.batch[bad_point]).tolist()
        named = [ids[e].item() for e in bad_events] if ids is not None else bad_events
        words += f"; dataset events {named} have non-finite point positions or features"
    return words
