"""pcfm: point-cloud foundation models for particle-detector data.

Package layout (each sub-package is one layer of the architecture):

- :mod:`pcfm.geometry`: detector geometries, cell index <-> position in mm;
- :mod:`pcfm.data`: file formats, point clouds (PyG ``Data``), lazy datasets, batch sampling;
- :mod:`pcfm.sim`: fast physics simulators, the embedded default data;
- :mod:`pcfm.ops`: geometric and attention ops on ragged batches (kNN, FPS, ...), with
  pure-torch references; :mod:`pcfm.kernels` holds their fused GPU kernels;
- :mod:`pcfm.cli`: the ``pcfm`` command line.
"""
__version__ = "0.1.0"
