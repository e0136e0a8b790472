"""pcfm: point-cloud foundation models for particle-detector data.

Package layout (each sub-package is one layer of the architecture):

- :mod:`pcfm.io`: atomic file writing;
- :mod:`pcfm.geometry`: detector geometries, cell index <-> position in mm;
- :mod:`pcfm.data`: file formats, point clouds (PyG ``Data``), lazy datasets, batch sampling;
- :mod:`pcfm.sim`: fast physics simulators, the embedded default data;
- :mod:`pcfm.ops`: geometric and attention ops on ragged batches (kNN, FPS, ...), with
  pure-torch references; :mod:`pcfm.kernels` holds their fused GPU kernels;
- :mod:`pcfm.nn`: the geometry-agnostic transformer-GNN backbone;
- :mod:`pcfm.tasks`: pretraining objectives (masked point modelling, point diffusion) and their
  Lightning module; :mod:`pcfm.finetuning`: downstream tasks and the fine-tuning module;
  :mod:`pcfm.engine`: the modules' shared base, data module and trainer;
- :mod:`pcfm.api`: the verbs :func:`pretrain`, :func:`finetune`, :func:`generate`,
  :func:`evaluate`, which are also the package's top-level names;
- :mod:`pcfm.cli`: the ``pcfm`` command line.
"""
__version__ = "0.1.0"
__all__ = ["pretrain", "finetune", "generate", "evaluate", "__version__"]

#: Top-level name -> module that defines it (imported on first use).
_VERBS = {"pretrain": "pcfm.api.pretraining", "finetune": "pcfm.api.finetuning",
          "generate": "pcfm.api.generation", "evaluate": "pcfm.api.evaluation"}


def __getattr__(name):
    # Lazy: ``import pcfm`` stays light (no Lightning) for users of the data tools alone. No
    # submodule is named like a verb, so importing one never rebinds these names.
    if name in _VERBS:
        import importlib

        value = getattr(importlib.import_module(_VERBS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pcfm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_VERBS))
