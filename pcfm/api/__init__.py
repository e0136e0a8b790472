"""The verbs of pcfm, one module each: what ``pcfm.pretrain``, ``pcfm.finetune``,
``pcfm.generate`` and ``pcfm.evaluate`` are, and the helpers their users need.

- :mod:`pcfm.api.pretraining`: :func:`pretrain` (masked point modelling, point diffusion);
- :mod:`pcfm.api.finetuning`: :func:`finetune` and its labelled views and balanced subsets;
- :mod:`pcfm.api.generation`: :func:`generate` showers with a diffusion checkpoint;
- :mod:`pcfm.api.evaluation`: :func:`evaluate` generated showers against a reference;
- :mod:`pcfm.api.quickstart`: the ``pcfm quickstart`` tour.

The module names are not the function names on purpose: a submodule ``pcfm.generate`` would
replace the function ``pcfm.generate`` on the package the moment it was imported.
"""
from pcfm.api.pretraining import (PretrainResult, backbone_config, load_initial_weights, objective_weights,
                                  pretrain)
from pcfm.api.finetuning import (FinetuneDataModule, FinetuneResult, LabelledView, balanced_subset, finetune,
                                 pretrained_backbone)
from pcfm.api.generation import GeneratedShowers, generate
from pcfm.api.evaluation import evaluate
from pcfm.api.quickstart import run_quickstart

__all__ = ["pretrain", "finetune", "generate", "evaluate", "run_quickstart", "PretrainResult", "FinetuneResult",
           "GeneratedShowers", "FinetuneDataModule", "LabelledView", "backbone_config", "objective_weights",
           "load_initial_weights", "balanced_subset", "pretrained_backbone"]
