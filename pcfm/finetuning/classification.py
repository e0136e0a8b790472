"""Event classification (particle identification): the class ``y`` of each event from the
pooled event embedding, by cross-entropy."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pcfm.data import PARTICLE_CLASSES, PARTICLE_NAMES
from pcfm.finetuning.metrics import class_metrics
from pcfm.finetuning.task import DownstreamTask, as_float_list, mlp_head

#: The default classes: the particles of :data:`pcfm.data.PARTICLE_CLASSES`, ``y`` indexing them.
PARTICLE_CLASS_NAMES = tuple(PARTICLE_NAMES[pdg] for pdg in PARTICLE_CLASSES)


def balanced_subset(indices: np.ndarray, classes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """``n_labels`` of ``indices``, as even over ``classes`` as they allow, drawn with ``seed``.

    Events are taken round-robin over the classes in a seeded random order, so every class gets
    ``n_labels // K`` (or one more) unless it has fewer events, whose share goes to the others.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(indices))
    classes = classes[order]
    rank = np.empty(len(order), dtype=np.int64)  # position of each event within its class
    by_class = np.argsort(classes, kind="stable")
    starts = np.searchsorted(classes[by_class], classes[by_class])
    rank[by_class] = np.arange(len(order)) - starts
    take = np.lexsort((rng.random(len(order)), rank))[:n_labels]
    return np.sort(indices[order[take]])


class Classification(DownstreamTask):
    """Args:
        class_names: the classes ``y`` indexes (default the particle classes; e.g.
            ``("photon", "pi0")`` for another label set). Events with ``y`` -1 are left out.
        class_weights: cross-entropy weight per class (default 1).
    """

    name = "classification"
    label_field = "y"
    OPTIONS = ("class_names", "class_weights")

    def __init__(self, class_names: Optional[Sequence[str]] = None, class_weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.class_names = list(class_names or self.default_class_names())
        self.class_weights = as_float_list(class_weights)
        n = len(self.class_names)
        weights = torch.ones(n) if class_weights is None else torch.tensor(list(class_weights))
        self.register_buffer("weights", weights.float())

    @classmethod
    def default_class_names(cls) -> tuple[str, ...]:
        return PARTICLE_CLASS_NAMES

    def build(self, width: int, hidden: int) -> None:
        self.head = mlp_head(width, hidden, len(self.class_names), norm=self.head_norm)

    def forward(self, output, batch) -> Tensor:
        return self.head(output.pooled)

    def labels(self, batch) -> Tensor:
        return batch.y.reshape(-1)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, labels, weight=self.weights, ignore_index=-1)

    def predict(self, outputs: Tensor, batch) -> dict[str, Tensor]:
        return {"prediction": outputs.argmax(1), "truth": self.labels(batch)}

    def metrics(self, prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        return class_metrics(prediction, truth, self.class_names)

    def check_label(self, item, index: int) -> int:
        super().check_label(item, index)
        return int(item.y.reshape(-1)[0])

    def subset(self, train: np.ndarray, classes: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
        """Balanced over the classes (:func:`balanced_subset`)."""
        return balanced_subset(train, classes, n_labels, seed)
