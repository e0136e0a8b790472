"""The interface every pretraining objective implements, and the registry of objectives by name.

An objective owns its own heads (decoders, denoisers) and computes its loss from a shared
:class:`~pcfm.nn.Backbone` and a ragged PyG batch. :class:`~pcfm.tasks.pretrain.PretrainModule`
holds one backbone and any number of objectives and sums their weighted losses, so masked point
modelling and point diffusion can train one encoder together.

Checkpoints store each objective's :meth:`Objective.config` next to the backbone config, and
:meth:`Objective.from_config` rebuilds it; everything an objective learns from data before
training (:meth:`Objective.on_data`) must therefore be a buffer or part of its config.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, ClassVar, Sequence

import torch

from torch import Tensor, nn

from pcfm.errors import PcfmError
from pcfm.nn import Backbone, BackboneConfig

#: Objective name -> "module:Class", imported on first use (an objective may need extra modules).
OBJECTIVES: dict[str, str] = {
    "mpm": "pcfm.tasks.mpm:MaskedPointModelling",
    "diffusion": "pcfm.tasks.diffusion:PointDiffusion",
}


class Objective(nn.Module):
    """A pretraining objective: its heads and its loss on a batch (see the module docstring).

    Subclasses set ``name`` (the key in :data:`OBJECTIVES`) and implement :meth:`loss` and
    :meth:`config`; the default :meth:`from_config` calls ``cls(**config, backbone_config=...)``
    when the constructor takes a ``backbone_config`` keyword, else ``cls(**config)``.
    """

    name: ClassVar[str]

    def loss(self, backbone: Backbone, batch) -> dict[str, Tensor]:
        """Loss terms on a batch. Must hold ``"loss"`` (a scalar to minimise); every other
        entry (scalars) is logged as ``<objective>/<key>``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor keywords (without the backbone config), for checkpoints."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], backbone_config: BackboneConfig) -> "Objective":
        """Rebuild an objective from :meth:`config` and the backbone it belongs to."""
        if "backbone_config" in inspect.signature(cls.__init__).parameters:
            return cls(**config, backbone_config=backbone_config)
        return cls(**config)

    def on_data(self, dataset) -> None:
        """Optional hook: fit statistics from the training data before training.

        :class:`~pcfm.tasks.pretrain.PretrainModule` runs it when training starts, unless the
        module already saw data (one rebuilt from a checkpoint). A resumed run runs it again on
        the same data, then the checkpoint's buffers replace what it learnt.

        ``dataset`` is the training split, a map-style torch Dataset of PyG ``Data`` point clouds
        (``len(dataset)``, ``dataset[i]``, items as :func:`pcfm.engine.data.pretraining_item`);
        it may be large, so subsample. Under DDP every process runs this on the same dataset, so
        it must be deterministic (seed any subsampling). Whatever is learnt must be a buffer or
        part of :meth:`config`. Default: nothing.
        """


def load_missing_as_zeros(module: nn.Module, names: Sequence[str]) -> None:
    """Let ``module`` load state dicts written before its entries ``names`` (parameters or
    buffers, dotted) existed: an absent one loads as zeros, the value each of them reserves for
    "not there", so an old checkpoint behaves as it did."""
    def fill(state_dict, prefix, *args) -> None:
        for name in names:
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(functools.reduce(getattr, name.split("."), module))

    module._register_load_state_dict_pre_hook(fill)


def get_objective_class(name: str) -> type[Objective]:
    """The objective class registered under ``name`` in :data:`OBJECTIVES`, imported now."""
    if name not in OBJECTIVES:
        raise PcfmError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    module_name, class_name = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
