"""Moved to :mod:`pcfm.finetuning` (the module, and one file per downstream task); these names
stay importable from here until pcfm 0.3."""
import warnings

warnings.warn("pcfm.tasks.finetune is deprecated and will be removed in pcfm 0.3; import from pcfm.finetuning",
              DeprecationWarning, stacklevel=2)
from pcfm.finetuning import MODES, FinetuneModule, backbone_state, task_metrics
from pcfm.finetuning.classification import PARTICLE_CLASS_NAMES
from pcfm.finetuning.metrics import f1_scores
from pcfm.finetuning.regression import REGRESSION_TARGETS, log_visible_energy, regression_values
from pcfm.finetuning.task import TASKS as _REGISTRY, mlp_head
from pcfm.data import SEMANTIC_CLASSES

TASKS = tuple(_REGISTRY)
CLASS_NAMES = {"classification": PARTICLE_CLASS_NAMES, "segmentation": SEMANTIC_CLASSES}

__all__ = ["TASKS", "MODES", "CLASS_NAMES", "REGRESSION_TARGETS", "FinetuneModule", "backbone_state", "task_metrics",
           "f1_scores", "log_visible_energy", "regression_values", "mlp_head"]
