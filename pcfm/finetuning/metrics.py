"""Metrics of classes: accuracy and per-class F1, shared by event and per-point classification."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def f1_scores(prediction: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class F1 = 2 TP / (2 TP + FP + FN); NaN for a class absent from truth and prediction."""
    tp = np.bincount(truth[prediction == truth], minlength=n_classes).astype(float)
    predicted = np.bincount(prediction, minlength=n_classes)
    actual = np.bincount(truth, minlength=n_classes)
    denominator = predicted + actual
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def class_metrics(prediction: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``accuracy``, ``f1/<class>`` for the classes present in ``truth`` and ``mean_f1`` over
    them; entries with truth -1 (unlabelled points) are left out."""
    keep = truth >= 0
    prediction, truth = prediction[keep], truth[keep]
    scores = f1_scores(prediction, truth, len(names))
    present = np.bincount(truth, minlength=len(names)) > 0
    metrics = {"accuracy": float(np.mean(prediction == truth)) if truth.size else math.nan}
    metrics.update({f"f1/{names[c]}": float(scores[c]) for c in np.flatnonzero(present)})
    metrics["mean_f1"] = float(np.mean(scores[present])) if present.any() else math.nan
    return metrics
