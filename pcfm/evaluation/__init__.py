"""Quality metrics for generated calorimeter showers (CaloChallenge style).

The pieces: :mod:`~pcfm.evaluation.features` (high-level features per shower),
:mod:`~pcfm.evaluation.distances` (separation power, Frechet and kernel distances),
:mod:`~pcfm.evaluation.classifier` (classifier two-sample test and ROC AUC) and
:mod:`~pcfm.evaluation.report` (JSON / markdown report), :mod:`~pcfm.evaluation.plots` (PNG plots).
:func:`pcfm.evaluate`
ties them together.
"""
from pcfm.evaluation.classifier import classifier_auc, roc_auc
from pcfm.evaluation.distances import (frechet_distance, kernel_distance, separation_power,
                                       separation_powers)
from pcfm.evaluation.features import feature_matrix, high_level_features
from pcfm.evaluation.plots import PLOT_CAPTIONS, make_plots
from pcfm.evaluation.report import markdown_summary, write_report

__all__ = ["classifier_auc", "roc_auc", "frechet_distance", "kernel_distance", "separation_power",
           "separation_powers", "feature_matrix", "high_level_features", "PLOT_CAPTIONS", "make_plots",
           "markdown_summary", "write_report"]
