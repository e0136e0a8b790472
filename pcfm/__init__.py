"""pcfm: point-cloud foundation models for particle-detector data.

Package layout (each sub-package is one layer of the architecture):

- :mod:`pcfm.geometry`: detector geometries, cell index <-> position in mm;
- :mod:`pcfm.data`: file formats, point clouds (PyG ``Data``), lazy datasets, batch sampling;
- :mod:`pcfm.sim`: fast physics simulators, the embedded default data;
- :mod:`pcfm.ops`: geometric and attention ops on ragged batches (kNN, FPS, ...), with
  pure-torch references; :mod:`pcfm.kernels` holds their fused GPU kernels;
- :mod:`pcfm.nn`: the geometry-agnostic transformer-GNN backbone;
- :mod:`pcfm.tasks`: pretraining objectives (masked point modelling, point diffusion) and the
  Lightning module; :mod:`pcfm.engine`: data module and trainer; :mod:`pcfm.api`:
  :func:`pretrain`; :mod:`pcfm.generate`: :func:`generate`;
- :mod:`pcfm.cli`: the ``pcfm`` command line.
"""
__version__ = "0.1.0"
__all__ = ["pretrain", "finetune", "generate", "__version__"]


def __getattr__(name):
    # Lazy: ``import pcfm`` stays light (no Lightning) for users of the data tools alone.
    if name == "pretrain":
        from pcfm.api import pretrain

        return pretrain
    if name == "finetune":
        from pcfm.api_finetune import finetune

        return finetune
    if name == "generate":
        from pcfm.generate import generate

        return generate
    raise AttributeError(f"module 'pcfm' has no attribute {name!r}")
