"""Pretraining objectives and the Lightning module that trains them.

- :mod:`pcfm.tasks.objective`: the :class:`Objective` interface and the registry by name;
- :mod:`pcfm.tasks.mpm`: masked point modelling (:class:`MaskedPointModelling`);
- :mod:`pcfm.tasks.diffusion`: point diffusion (``PointDiffusion``), with the EDM formulas and
  samplers in :mod:`pcfm.tasks.edm` and the per-event models in :mod:`pcfm.tasks.event_model`;
- :mod:`pcfm.tasks.pretrain`: :class:`PretrainModule`, backbone + weighted objectives.

Objectives are imported lazily (:func:`get_objective_class`), so importing this package is cheap.
"""
from pcfm.tasks.objective import OBJECTIVES, Objective, get_objective_class

__all__ = ["OBJECTIVES", "Objective", "get_objective_class"]
