"""Classifier two-sample test: how well can a small network tell generated from reference?

A perfect generator gives a ROC AUC of 0.5 on held-out showers; 1.0 means every shower is
recognised. The network (CPU-fast by design, so that evaluation needs no GPU):

    input (standardised with the training split's column mean and std)
    -> Linear(d, 256) -> LeakyReLU -> Dropout(0.2)
    -> Linear(256, 256) -> LeakyReLU -> Dropout(0.2) -> Linear(256, 1) logit

trained with binary cross-entropy and Adam (lr 1e-3, batch 128) for at most 50 epochs. Both
samples are first cut to the same size (so that 0.5 is the chance level), shuffled and split
60 / 20 / 20 into train / validation / test; training stops once the validation loss has not
improved for 5 epochs and the weights of the best epoch are kept (early stopping guards
against memorising small samples), and the AUC is measured on the test split only.
Everything is seeded; the global torch random state is left untouched. Inputs are held in
float32 (a ds3 sample of 10k showers takes 1.6 GB).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

HIDDEN = 256
DROPOUT = 0.2


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive (label 1) scores above
    a random negative, ties counting one half (the Mann-Whitney U statistic from average ranks)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the ROC AUC needs both positive and negative examples")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct score: last rank of its run minus half the run
    average_rank = np.cumsum(counts) - 0.5 * (counts - 1)
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _network(n_inputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_inputs, HIDDEN), nn.LeakyReLU(), nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, HIDDEN), nn.LeakyReLU(), nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, 1),
    )


def classifier_auc(generated: np.ndarray, reference: np.ndarray, *, epochs: int = 50, patience: int = 5,
                   batch_size: int = 128, learning_rate: float = 1e-3, seed: int = 0) -> dict:
    """Train the network to separate ``generated`` (N, d) from ``reference`` (M, d) rows.

    Returns ``{"auc", "n_train", "n_test", "best_epoch", "epochs_run"}`` with the test-split
    ROC AUC (generated is the positive class).
    """
    n = min(len(generated), len(reference))
    if n < 10:
        raise ValueError(f"the classifier test needs at least 10 showers per sample, got {n}")
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([generated[rng.permutation(len(generated))[:n]],
                             reference[rng.permutation(len(reference))[:n]]]).astype(np.float32)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    order = rng.permutation(2 * n)
    n_train, n_val = int(0.6 * 2 * n), int(0.2 * 2 * n)
    splits = np.split(order, [n_train, n_train + n_val])
    mean = inputs[splits[0]].mean(axis=0, dtype=np.float64)
    std = inputs[splits[0]].std(axis=0, dtype=np.float64)
    inputs = ((inputs - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    x_train, x_val, x_test = (torch.as_tensor(inputs[s], dtype=torch.float32) for s in splits)
    y_train, y_val, _ = (torch.as_tensor(labels[s], dtype=torch.float32) for s in splits)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _network(inputs.shape[1])
        optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
        loss_fn = nn.BCEWithLogitsLoss()
        best_loss, best_epoch, best_state = np.inf, 0, None
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in torch.randperm(len(x_train)).split(batch_size):
                optimiser.zero_grad()
                loss_fn(model(x_train[batch]).squeeze(1), y_train[batch]).backward()
                optimiser.step()
            model.eval()
            with torch.no_grad():
                val_loss = loss_fn(model(x_val).squeeze(1), y_val).item()
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= patience:
                break
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            scores = model(x_test).squeeze(1).numpy()
    return {"auc": roc_auc(scores, labels[splits[2]]), "n_train": len(splits[0]), "n_test": len(splits[2]),
            "best_epoch": best_epoch, "epochs_run": epoch}
