"""Per-point classification (LArTPC semantic segmentation): the ``semantic`` class of every point
from the per-point features, by a cross-entropy whose class weights (inverse training-set
frequencies, :meth:`Segmentation.fit_options`) counter the imbalance of rare classes."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import Tensor

from pcfm.data import SEMANTIC_CLASSES
from pcfm.errors import DataError
from pcfm.finetuning.classification import Classification


class Segmentation(Classification):
    """Args: as :class:`~pcfm.finetuning.classification.Classification`, over the point classes
    (default :data:`pcfm.data.SEMANTIC_CLASSES`); points labelled -1 are left out."""

    name = "segmentation"
    label_field = "semantic"
    per_point = True
    default_geometry = "lartpc-768"

    @classmethod
    def default_class_names(cls) -> tuple[str, ...]:
        return SEMANTIC_CLASSES

    def forward(self, output, batch) -> Tensor:
        return self.head(output.point_features)

    def labels(self, batch) -> Tensor:
        return batch.semantic

    def check_label(self, item, index: int) -> int:
        label = getattr(item, self.label_field, None)
        if label is None:
            raise DataError(f"has no {self.label_field!r} label, which {self.name} needs", event=int(index))
        if label.numel() != item.num_nodes:
            raise DataError(f"has {label.numel()} {self.label_field!r} labels for {item.num_nodes} points",
                            event=int(index))
        return 0

    def subset(self, train: np.ndarray, classes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
        """A seeded random draw (events hold points of every class)."""
        return np.sort(np.random.default_rng(seed).choice(train, n_labels, replace=False))

    def fit_options(self, events: Sequence) -> dict[str, Any]:
        """``class_weights``: inverse frequency of each class among the training points, scaled
        so that the weighted mean over the training points is 1 (classes without points weigh 1)."""
        counts = np.zeros(len(self.class_names))
        for item in events:
            labels = item.semantic.numpy()
            counts += np.bincount(labels[labels >= 0], minlength=len(counts))[:len(counts)]
        present = counts > 0
        weights = np.ones_like(counts)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        return {"class_weights": weights.tolist()}
