"""Simple reference models (no neural network) for the transfer benchmark's tasks.

A network's accuracy means little on its own: these references put a well-tuned classical model
beside every network result, on the same labels and the same test set.

- calorimeter showers: :func:`shower_features` (284 high-level features per shower: the
  longitudinal profile, lateral widths and shapes per layer, and global ones), then
  :func:`classify` (particle id, gamma vs pi0) or :func:`regress_energy` (incident energy);
- LArTPC events: :func:`point_features` (26 local features per point: energy, neighbourhood
  density, local PCA shape, the point's connected fragment), then :func:`segment` (per-point
  boosted trees).

Every hyper-parameter is chosen on a validation split that the caller gives, never on the test
set; the test set is scored once, with the chosen settings.

Command line (prints the command and machine, a table of mean +- standard error over seeds,
and writes ``benchmarks/results/references_<task>.json``)::

    python benchmarks/references.py --task pid --n-labels 100 1000 --seeds 0 1 2
    python benchmarks/references.py --task segmentation --n-labels 100 --seeds 0 1 2
    python benchmarks/references.py --task gamma_pi0 --n-labels 100 300 --seeds 0 1 2
    python benchmarks/references.py --task regression --n-labels 100 1000 --seeds 0 1 2

scikit-learn and scipy are needed here (``pip install -e ".[bench]"``); pcfm itself does not
import them.

The features live in ``reference_features.py``; this file fits the references and holds the
command line.

Why one module of this length: the reference fits (with their validation-chosen settings and
metrics, used by transfer.py) and the standalone command line that reproduces the issue's
baseline table on the same code; the features live in reference_features.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from _common import RESULTS_DIR, announce, log, write_results
from reference_features import PointSet, shower_features
# read as references.X by the tests and the transfer benchmark:
from reference_features import (FRACTION_FLOOR, POINT_FEATURE_NAMES, SHOWER_FEATURE_NAMES,  # noqa: F401
                                point_features, shower_feature_names)

# ----------------------------------------------------------------------------- fitting

#: Inverse regularisation strengths tried for the logistic regression, with each penalty.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Penalties tried for the logistic regression. L1 selects features: with few labels it drops
#: the many uninformative ones (deep layers for e / gamma), which L2 can only shrink. On
#: par04-scipb pid (pools of seeds 201 and 901, test sets of seeds 202 and 999, 3 label seeds
#: each) L1 alone scores 0.80-0.85 with 100 labels and 0.83-0.85 with 1000, L2 alone 0.79-0.80
#: and 0.82-0.84.
LOGISTIC_PENALTIES = ("l2", "l1")
#: Penalties tried for the linear energy regression: ridge (L2) and lasso (L1) strengths, on
#: standardised features. Ridge alone cannot single out the one feature that matters (log
#: visible energy) among ~280 with 100 labels: its resolution on par04-scipb e / gamma was
#: 0.20-0.22 where lasso's was 0.055-0.066 and a plain calibration on log visible energy 0.055.
ALPHA_GRID = {"l2": (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0),
              "l1": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)}
#: Boosted trees: (learning rate, max leaf nodes) tried, each along a path of iteration counts.
BOOSTED_GRID = ((0.1, 7), (0.1, 15), (0.1, 31), (0.05, 15))
BOOSTED_ITERATIONS = (25, 50, 100, 200, 400)


@contextlib.contextmanager
def _threads(threads: Optional[int]):
    """Limit BLAS / OpenMP threads (the trees' and the solvers') to ``threads`` (None: no limit)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads):
        yield


def _min_leaf(n_train: int) -> int:
    """Trees' minimum leaf size: 20 (sklearn's default) for large sets, smaller for tiny ones."""
    return int(np.clip(n_train // 20, 2, 20))


def _boosted_path(model, X, y, sample_weight, score, iterations=BOOSTED_ITERATIONS, patience: int = 2):
    """Grow ``model`` (warm start) through ``iterations``: early stopping on validation data.

    ``score(model)`` is a validation score (higher is better). The path stops after ``patience``
    steps without improvement. Returns (best score, its iteration count, a copy of the model
    at that size).
    """
    best, best_iter, best_model, worse = -math.inf, iterations[0], None, 0
    for n_iter in iterations:
        model.set_params(max_iter=n_iter)
        model.fit(X, y, sample_weight=sample_weight)
        value = score(model)
        if value > best + 1e-12:
            best, best_iter, best_model, worse = value, n_iter, copy.deepcopy(model), 0
        else:
            worse += 1
            if worse >= patience:
                break
    return best, best_iter, best_model


#: Standardised features are clipped to +- this many training standard deviations before a
#: linear model: a feature that hardly varies in a small training set (a deep layer's log
#: fraction, say) otherwise extrapolates wildly on a test event (ridge once predicted E = inf).
STANDARD_CLIP = 10.0


def _clip_standardised(X: np.ndarray) -> np.ndarray:
    return np.clip(X, -STANDARD_CLIP, STANDARD_CLIP)


def _linear_pipeline(model):
    """StandardScaler, clipping at :data:`STANDARD_CLIP`, then ``model``."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(StandardScaler(), FunctionTransformer(_clip_standardised), model)


def _logistic_regression(C: float, penalty: str):
    """A LogisticRegression with an L2 (lbfgs) or L1 (saga) penalty, on any scikit-learn >= 1.3
    (1.8 deprecated ``penalty`` for ``l1_ratio``)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    if penalty == "l2":
        return LogisticRegression(C=C, max_iter=5000)
    if penalty != "l1":
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    options = dict(C=C, solver="saga", max_iter=3000, tol=1e-3)
    if tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, **options)
    return LogisticRegression(penalty="l1", **options)


def classification_metrics(truth: np.ndarray, prediction: np.ndarray, proba: Optional[np.ndarray] = None) -> dict:
    """accuracy, mean_f1 (macro F1 over the classes in ``truth``, as pcfm's ``task_metrics``: a
    class never predicted scores 0) and, for two classes, roc_auc from ``proba[:, 1]``."""
    from sklearn.metrics import f1_score, roc_auc_score

    present = np.unique(truth)
    metrics = {"accuracy": float(np.mean(prediction == truth)),
               "mean_f1": float(f1_score(truth, prediction, labels=present, average="macro", zero_division=0)),
               "n_test": int(len(truth))}
    if proba is not None and proba.shape[1] == 2 and len(present) == 2:
        metrics["roc_auc"] = float(roc_auc_score(truth, proba[:, 1]))
    return metrics


def classify(train_X, train_y, val_X, val_y, test_X, test_y, seed: int = 0, *,
             models: Sequence[str] = ("logistic", "boosted"), threads: Optional[int] = 1) -> dict:
    """Logistic regression and boosted trees on event features; settings chosen on validation.

    Why: the linear model says what the features separate on their own, the trees what they
    separate with interactions; a network should beat both. ``logistic``: StandardScaler
    (clipped at :data:`STANDARD_CLIP`) + LogisticRegression, the penalty (:data:`LOGISTIC_PENALTIES`) and C (:data:`C_GRID`) by
    validation accuracy (ties: lower validation log-loss). ``boosted``: HistGradientBoostingClassifier over :data:`BOOSTED_GRID`, each grown
    through :data:`BOOSTED_ITERATIONS` with the iteration count chosen on validation accuracy
    (early stopping on the validation data; the model is kept at that size). The test set is scored
    once per model. Returns ``{model: {"test": metrics, "val_accuracy", "params", "n_train",
    "n_val", "fit_seconds"}, "best": the model with the higher validation accuracy (ties: the
    logistic regression), with "model" naming it}``; metrics are :func:`classification_metrics`.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import log_loss

    train_X, val_X, test_X = (np.asarray(a, dtype=np.float64) for a in (train_X, val_X, test_X))
    train_y, val_y, test_y = (np.asarray(a).astype(np.int64).reshape(-1) for a in (train_y, val_y, test_y))
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"the training labels hold a single class {classes.tolist()}")
    result: dict[str, Any] = {}
    with _threads(threads):
        if "logistic" in models:
            start = time.perf_counter()
            best = None
            for penalty in LOGISTIC_PENALTIES:
                for C in C_GRID:
                    model = _linear_pipeline(_logistic_regression(C, penalty))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        model.fit(train_X, train_y)
                    accuracy = float(np.mean(model.predict(val_X) == val_y))
                    loss = float(log_loss(val_y, model.predict_proba(val_X), labels=model.classes_))
                    if best is None or (accuracy, -loss) > (best[0], -best[1]):
                        best = (accuracy, loss, {"penalty": penalty, "C": C}, model)
            accuracy, loss, params, model = best
            result["logistic"] = {
                "test": classification_metrics(test_y, model.predict(test_X), model.predict_proba(test_X)),
                "val_accuracy": accuracy, "val_log_loss": loss, "params": params,
                "n_train": len(train_y), "n_val": len(val_y), "fit_seconds": time.perf_counter() - start}
        if "boosted" in models:
            start = time.perf_counter()
            best = None
            for lr, leaves in BOOSTED_GRID:
                model = HistGradientBoostingClassifier(
                    learning_rate=lr, max_leaf_nodes=leaves, min_samples_leaf=_min_leaf(len(train_y)),
                    early_stopping=False, warm_start=True, random_state=seed)
                score, n_iter, model = _boosted_path(model, train_X, train_y, None,
                                                     lambda m: float(np.mean(m.predict(val_X) == val_y)))
                if best is None or score > best[0]:
                    best = (score, {"learning_rate": lr, "max_leaf_nodes": leaves, "max_iter": n_iter}, model)
            score, params, model = best
            result["boosted"] = {
                "test": classification_metrics(test_y, model.predict(test_X), model.predict_proba(test_X)),
                "val_accuracy": score, "params": params, "n_train": len(train_y), "n_val": len(val_y),
                "fit_seconds": time.perf_counter() - start}
    fitted = [name for name in ("logistic", "boosted") if name in result]
    name = max(fitted, key=lambda m: (result[m]["val_accuracy"], m == "logistic"))
    result["best"] = {"model": name, **result[name]}
    return result


def energy_metrics(log_e_pred: np.ndarray, log_e_true: np.ndarray) -> dict:
    """Relative resolution std((E_pred - E) / E) and bias mean((E_pred - E) / E), as pcfm's
    ``task_metrics("regression", ...)`` names them."""
    error = np.exp(np.asarray(log_e_pred) - np.asarray(log_e_true)) - 1.0
    return {"incident_energy/resolution": float(np.std(error)), "incident_energy/bias": float(np.mean(error)),
            "n_test": int(len(error))}


def regress_energy(train_X, train_log_e, val_X, val_log_e, test_X, test_log_e, seed: int = 0, *,
                   models: Sequence[str] = ("linear", "boosted"), threads: Optional[int] = 1) -> dict:
    """Linear regression (ridge or lasso) and boosted trees predicting log(E_incident / MeV);
    every setting chosen on validation.

    Why: a calorimeter measures energy by calibrating its visible energy, corrected by the
    shower's shape (leakage, sampling fluctuations); these are that calibration, linear and
    non-linear, for a network to beat. The features must not contain the incident energy
    (``shower_features(..., use_incident_energy=False)``). ``linear``: StandardScaler (clipped at
    :data:`STANDARD_CLIP`) + Ridge or Lasso, the penalty and its strength from
    :data:`ALPHA_GRID`; ``boosted``: HistGradientBoostingRegressor over
    :data:`BOOSTED_GRID` with the iteration count chosen on validation; both by the validation
    relative resolution std((E_pred - E) / E). Returns, per model, ``test``
    (:func:`energy_metrics`), ``val_resolution``, ``params``, sizes and time, and ``best`` (the
    lower validation resolution; ties: the linear model).
    """
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso, Ridge

    train_X, val_X, test_X = (np.asarray(a, dtype=np.float64) for a in (train_X, val_X, test_X))
    train_t, val_t, test_t = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (train_log_e, val_log_e, test_log_e))

    def val_resolution(model) -> float:
        return energy_metrics(model.predict(val_X), val_t)["incident_energy/resolution"]

    result: dict[str, Any] = {}
    with _threads(threads):
        if "linear" in models:
            start = time.perf_counter()
            best = None
            for penalty, alphas in ALPHA_GRID.items():
                for alpha in alphas:
                    regressor = Ridge(alpha=alpha) if penalty == "l2" else Lasso(alpha=alpha, max_iter=20_000)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        model = _linear_pipeline(regressor).fit(train_X, train_t)
                    value = val_resolution(model)
                    if best is None or value < best[0]:
                        best = (value, {"penalty": penalty, "alpha": alpha}, model)
            value, params, model = best
            result["linear"] = {"test": energy_metrics(model.predict(test_X), test_t), "val_resolution": value,
                                "params": params, "n_train": len(train_t), "n_val": len(val_t),
                                "fit_seconds": time.perf_counter() - start}
        if "boosted" in models:
            start = time.perf_counter()
            best = None
            for lr, leaves in BOOSTED_GRID:
                model = HistGradientBoostingRegressor(
                    learning_rate=lr, max_leaf_nodes=leaves, min_samples_leaf=_min_leaf(len(train_t)),
                    early_stopping=False, warm_start=True, random_state=seed)
                score, n_iter, model = _boosted_path(model, train_X, train_t, None, lambda m: -val_resolution(m))
                if best is None or -score < best[0]:
                    best = (-score, {"learning_rate": lr, "max_leaf_nodes": leaves, "max_iter": n_iter}, model)
            value, params, model = best
            result["boosted"] = {"test": energy_metrics(model.predict(test_X), test_t), "val_resolution": value,
                                 "params": params, "n_train": len(train_t), "n_val": len(val_t),
                                 "fit_seconds": time.perf_counter() - start}
    fitted = [name for name in ("linear", "boosted") if name in result]
    name = min(fitted, key=lambda m: (result[m]["val_resolution"], m != "linear"))
    result["best"] = {"model": name, **result[name]}
    return result


#: Segmentation trees: (class-weight power, max leaf nodes) tried; power p weights class c by
#: (1 / frequency_c) ** p (0: none, 1: fully balanced).
SEGMENT_GRID = ((1.0, 31), (0.5, 31))
SEGMENT_ITERATIONS = (50, 100, 200)
#: Validation points scored per setting (a seeded uniform subsample beyond this).
MAX_VAL_POINTS = 300_000


def segmentation_metrics_function():
    """``pcfm.finetuning.task_metrics`` (the networks' metrics), or, where the network code
    does not import (it is being rewritten), :func:`_task_metrics_mirror`, its copy (tested equal)."""
    try:
        from pcfm.finetuning import task_metrics
    except ImportError as error:  # pcfm.tasks imports pcfm.nn
        log(f"[references] pcfm.finetuning does not import ({error}); using its metrics' mirror")
        return _task_metrics_mirror
    return task_metrics


def _task_metrics_mirror(task: str, prediction: np.ndarray, truth: np.ndarray) -> dict:
    """A copy of ``task_metrics`` for "segmentation": accuracy, per-class F1 = 2 TP / (2 TP + FP
    + FN) for the classes in ``truth`` and their mean (points with class -1 left out)."""
    from pcfm.data import SEMANTIC_CLASSES

    assert task == "segmentation", task
    keep = truth >= 0
    prediction, truth = prediction[keep], truth[keep]
    n = len(SEMANTIC_CLASSES)
    tp = np.bincount(truth[prediction == truth], minlength=n).astype(float)
    denominator = np.bincount(prediction[prediction >= 0], minlength=n) + np.bincount(truth, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    present = np.bincount(truth, minlength=n) > 0
    metrics = {"accuracy": float(np.mean(prediction == truth)) if truth.size else math.nan}
    metrics.update({f"f1/{SEMANTIC_CLASSES[c]}": float(scores[c]) for c in np.flatnonzero(present)})
    metrics["mean_f1"] = float(np.mean(scores[present])) if present.any() else math.nan
    return metrics


def _as_points(events) -> PointSet:
    return events if isinstance(events, PointSet) else PointSet(events)


def segment(train_events, val_events, test_events, seed: int = 0, *, max_train_points: int = 100_000,
            threads: Optional[int] = 1) -> dict:
    """Per-point boosted trees on :func:`point_features` for LArTPC semantic segmentation.

    Why: PoLAr-MAE-style claims ("100 labelled events match a large supervised model") need a
    strong cheap reference on the same events; local shape features plus trees are that.

    Each argument is a list of events (``Data`` with ``pos``, ``energy``, ``semantic``) or a
    :class:`PointSet` of them. Training points are subsampled to at most ``max_train_points``,
    class-balanced (every point of a rare class is kept when the cap allows; the common
    classes share the rest), and reweighted so that class c weighs (1 / frequency_c) ** p
    relative to its true frequency in the training events; p and the tree size come from
    :data:`SEGMENT_GRID`, the iteration count from :data:`SEGMENT_ITERATIONS`, all by mean F1 on
    the validation events (points with class -1 ignored). The test metrics are
    ``pcfm.finetuning.task_metrics("segmentation", ...)``: accuracy, ``f1/<class>`` and
    ``mean_f1`` over the classes present in the test truth. Returns ``{"boosted": {"test",
    "val_mean_f1", "params", "n_train_points", "n_train_events", ...}, "best": same}``.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    task_metrics = segmentation_metrics_function()
    train, val, test = (_as_points(events) for events in (train_events, val_events, test_events))
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(train.y >= 0)
    counts = np.bincount(train.y[labelled], minlength=5).astype(float)
    keep = _balanced_cap(train.y[labelled], max_train_points, rng)
    rows = labelled[keep]
    kept = np.bincount(train.y[rows], minlength=len(counts)).astype(float)
    X, y = train.X[rows], train.y[rows]
    frequency = counts / counts.sum()
    rate = np.divide(kept, counts, out=np.ones_like(counts), where=counts > 0)  # share of each class kept
    val_rows = np.flatnonzero(val.y >= 0)
    if len(val_rows) > MAX_VAL_POINTS:
        val_rows = np.sort(rng.choice(val_rows, MAX_VAL_POINTS, replace=False))
    vX, vy = val.X[val_rows], val.y[val_rows]

    def weights(power: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            per_class = np.where(counts > 0, np.maximum(frequency, 1e-12) ** -power / np.maximum(rate, 1e-12), 0.0)
        w = per_class[y]
        return w / w.mean()

    start = time.perf_counter()
    best = None
    with _threads(threads):
        for power, leaves in SEGMENT_GRID:
            model = HistGradientBoostingClassifier(learning_rate=0.1, max_leaf_nodes=leaves, early_stopping=False,
                                                   warm_start=True, random_state=seed)
            score, n_iter, model = _boosted_path(
                model, X, y, weights(power),
                lambda m: task_metrics("segmentation", m.predict(vX), vy)["mean_f1"], SEGMENT_ITERATIONS)
            if best is None or score > best[0]:
                best = (score, power, {"learning_rate": 0.1, "max_leaf_nodes": leaves, "max_iter": n_iter}, model)
        score, power, params, model = best
        fit_seconds = time.perf_counter() - start
        test_rows = np.flatnonzero(test.y >= 0)
        prediction = np.full(len(test.y), -1, dtype=np.int64)
        prediction[test_rows] = model.predict(test.X[test_rows])
    metrics = task_metrics("segmentation", prediction, test.y)
    metrics.update(n_test_points=int(len(test_rows)), n_test=len(test))
    boosted = {"test": metrics, "val_mean_f1": score, "params": {**params, "class_weight_power": power},
               "n_train_events": len(train), "n_train_points": int(len(rows)), "n_val_events": len(val),
               "fit_seconds": fit_seconds}
    return {"boosted": boosted, "best": {"model": "boosted", **boosted}}


def _balanced_cap(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``cap`` of ``labels``, as even over the classes as they allow (a class
    with fewer points than its share gives its rest to the others), drawn with ``rng``; sorted."""
    if len(labels) <= cap:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    left, open_ = cap, np.ones(len(classes), dtype=bool)
    while left > 0 and open_.any():  # water-filling over the classes
        share = max(left // int(open_.sum()), 1)
        for c in np.flatnonzero(open_):
            take = min(share, counts[c] - quota[c], left)
            quota[c] += take
            left -= take
            if quota[c] == counts[c]:
                open_[c] = False
            if left == 0:
                break
    picks = [rng.choice(np.flatnonzero(labels == c), quota[k], replace=False) for k, c in enumerate(classes)]
    return np.sort(np.concatenate(picks))


# ----------------------------------------------------------------------------- command line

#: Simulation seeds of the labelled pools and test sets (those of benchmarks/transfer.py).
SEED_POOL = {"pid": 201, "regression": 211, "segmentation": 301}
SEED_TEST = {"pid": 202, "regression": 212, "segmentation": 302}
TARGET_GEOMETRY = "par04-scipb"
LARTPC_GEOMETRY = "lartpc-768"
GEANT4_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "geant4"
GAMMA_PI0_FILES = ("ds2_photons_20-100GeV.h5", "ds2_pi0_20-100GeV_decay500mm.h5")
#: Held-out Geant4 showers per class for gamma vs pi0 (a fixed seeded draw).
GAMMA_PI0_TEST_PER_CLASS = 300


def simulate_events(task: str, n: int, seed: int, energy_range=(1e3, 1e5)) -> list:
    """``n`` simulated events of a task as a list of ``Data``, the same events as
    ``pcfm.engine.data.simulate_pretraining_events`` (as benchmarks/transfer.py simulates them;
    tested), made here from pcfm.sim directly so that the references do not import the network
    code: LArTPC events for "segmentation", e / gamma / pi showers on par04-scipb for "pid",
    e / gamma for "regression", log-uniform in ``energy_range`` (MeV), theta pi/2 +- 0.3."""
    from pcfm import geometry as geometries
    from pcfm.data import PARTICLE_NAMES, ShowerDataset, lartpc_to_data
    from pcfm.sim import simulate_lartpc_events, simulate_showers

    rng = np.random.default_rng(seed)
    if task == "segmentation":
        geometry = geometries.get(LARTPC_GEOMETRY)
        return [lartpc_to_data(event, geometry) for event in simulate_lartpc_events(n, rng=rng)]
    codes = {name: code for code, name in PARTICLE_NAMES.items()}
    particles = ("electron", "photon", "pion") if task == "pid" else ("electron", "photon")
    pdg = np.array([codes[p] for p in particles])[rng.integers(len(particles), size=n)]
    showers = simulate_showers(geometries.get(TARGET_GEOMETRY), n, particle=pdg, energy=tuple(energy_range),
                               theta=(math.pi / 2 - 0.3, math.pi / 2 + 0.3), rng=rng)
    dataset = ShowerDataset(showers)
    return [dataset[i] for i in range(len(dataset))]


def read_gamma_pi0(directory: Path = GEANT4_DIR, per_class: Optional[int] = None) -> tuple[list, np.ndarray]:
    """The Geant4 20-100 GeV photon and pi0 showers of ``directory`` as point clouds, label
    0 photon / 1 pi0 (cells below the ds2 readout threshold dropped); the first ``per_class``
    of each file when given."""
    import h5py

    from pcfm.data.pointcloud import cells_to_data

    events, labels = [], []
    for label, name in enumerate(GAMMA_PI0_FILES):
        path = Path(directory) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is absent: the gamma / pi0 benchmark needs the Geant4 files of "
                                    "shared/data/geant4")
        with h5py.File(path, "r") as f:
            showers, energies = f["showers"][:per_class], f["incident_energies"][:per_class].reshape(-1)
        events += [cells_to_data(s, float(e), "calochallenge-ds2") for s, e in zip(showers, energies)]
        labels += [label] * len(showers)
    return events, np.array(labels, dtype=np.int64)


def balanced_pick(candidates: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``candidates``, as even over ``labels[candidates]`` as they allow; sorted."""
    chosen = _balanced_cap(labels[candidates], n, rng)
    return np.sort(candidates[chosen])


def split_labels(labels: np.ndarray, n_train: int, n_val: int, seed: int, balanced: bool = True):
    """Disjoint (train, validation) indices into a pool: ``n_train`` then ``n_val``, balanced
    over the classes when ``balanced`` (else uniform), seeded."""
    if n_train + n_val > len(labels):
        raise ValueError(f"{n_train} training + {n_val} validation events but the pool holds {len(labels)}")
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    if balanced:
        train = balanced_pick(everything, labels, n_train, rng)
        rest = np.setdiff1d(everything, train)
        val = balanced_pick(rest, labels, n_val, rng)
    else:
        order = rng.permutation(everything)
        train, val = np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val])
    return train, val


def summarise(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 with one value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def run(args) -> list[dict]:
    task = args.task
    rows = []
    timer = time.perf_counter()
    if task == "gamma_pi0":
        events, labels = read_gamma_pi0(Path(args.geant4_dir))
        rng = np.random.default_rng(12345)
        test = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), args.gamma_pi0_test_per_class,
                                                  replace=False) for c in (0, 1)]))
        pool = np.setdiff1d(np.arange(len(labels)), test)
        X = shower_features(events, "calochallenge-ds2", use_incident_energy=True)
        pool_X, pool_y, test_X, test_y = X[pool], labels[pool], X[test], labels[test]
        log(f"[data] gamma/pi0: {len(events)} Geant4 showers read; pool {np.bincount(pool_y).tolist()}, "
            f"test {np.bincount(test_y).tolist()} per class; features {X.shape} in {time.perf_counter() - timer:.1f} s")
    elif task in ("pid", "regression"):
        n_pool = max(args.n_labels) + args.n_val
        pool_events = simulate_events(task, n_pool, SEED_POOL[task])
        test_events = simulate_events(task, args.n_test, SEED_TEST[task])
        log(f"[data] {task}: simulated {n_pool} pool + {args.n_test} test showers on {TARGET_GEOMETRY} in "
            f"{time.perf_counter() - timer:.1f} s")
        timer = time.perf_counter()
        use_incident = task == "pid"
        pool_X = shower_features(pool_events, TARGET_GEOMETRY, use_incident_energy=use_incident)
        test_X = shower_features(test_events, TARGET_GEOMETRY, use_incident_energy=use_incident)
        if task == "pid":
            pool_y = np.array([int(e.y) for e in pool_events])
            test_y = np.array([int(e.y) for e in test_events])
        else:
            pool_y = np.log(np.array([float(e.incident_energy) for e in pool_events]))
            test_y = np.log(np.array([float(e.incident_energy) for e in test_events]))
        log(f"[data] features {pool_X.shape[1]} per shower in {time.perf_counter() - timer:.1f} s")
    else:
        n_pool = max(args.n_labels) + args.n_val
        pool_events = simulate_events(task, n_pool, SEED_POOL[task])
        test_events = simulate_events(task, args.n_test, SEED_TEST[task])
        log(f"[data] segmentation: simulated {n_pool} pool + {args.n_test} test events "
            f"({sum(e.num_nodes for e in pool_events) / n_pool:.0f} points per event) in "
            f"{time.perf_counter() - timer:.1f} s")
        timer = time.perf_counter()
        pool_points, test_points = PointSet(pool_events), PointSet(test_events)
        pool_y = np.zeros(len(pool_points), dtype=np.int64)
        log(f"[data] point features of {len(pool_points.y) + len(test_points.y)} points in "
            f"{time.perf_counter() - timer:.1f} s")

    for n in args.n_labels:
        for seed in args.seeds:
            start = time.perf_counter()
            balanced = task in ("pid", "gamma_pi0")
            train, val = split_labels(pool_y, n, args.n_val, seed, balanced=balanced)
            if task in ("pid", "gamma_pi0"):
                result = classify(pool_X[train], pool_y[train], pool_X[val], pool_y[val], test_X, test_y, seed,
                                  models=args.models, threads=args.threads)
            elif task == "regression":
                models = [{"logistic": "linear"}.get(m, m) for m in args.models]
                result = regress_energy(pool_X[train], pool_y[train], pool_X[val], pool_y[val], test_X, test_y,
                                        seed, models=models, threads=args.threads)
            else:
                result = segment(pool_points.subset(train), pool_points.subset(val), test_points, seed,
                                 max_train_points=args.max_train_points, threads=args.threads)
            for model, entry in result.items():
                rows.append({"task": task, "model": model, "n_labels": n, "n_val": len(val), "seed": seed,
                             "chosen": entry.get("model", model), "params": entry["params"],
                             "val_score": entry.get("val_accuracy", entry.get("val_resolution", entry.get("val_mean_f1"))),
                             "metrics": entry["test"], "fit_seconds": entry["fit_seconds"]})
            best = result["best"]
            shown = {k: round(v, 4) for k, v in best["test"].items() if isinstance(v, float)}
            log(f"[run] {task} n={n} seed={seed}: best {best['model']} {best['params']} -> {shown} "
                f"({time.perf_counter() - start:.1f} s)")
    return rows


PRIMARY = {"pid": "accuracy", "gamma_pi0": "accuracy", "regression": "incident_energy/resolution",
           "segmentation": "mean_f1"}


def table(rows: list[dict], task: str) -> str:
    """Mean +- standard error over seeds per model and label count, as markdown."""
    metric = PRIMARY[task]
    extra = {"pid": ["mean_f1"], "gamma_pi0": ["roc_auc", "mean_f1"], "regression": ["incident_energy/bias"],
             "segmentation": ["accuracy", "f1/shower", "f1/track", "f1/michel", "f1/delta", "f1/low_energy"]}[task]
    header = ["model", "labels", "seeds", metric] + extra + ["fit s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in dict.fromkeys(r["n_labels"] for r in rows):
            group = [r for r in rows if r["model"] == model and r["n_labels"] == n]
            if not group:
                continue
            cells = [model if model != "best" else "best (by validation)", str(n), str(len(group))]
            for key in [metric] + extra:
                values = [r["metrics"][key] for r in group if key in r["metrics"]]
                if values:
                    mean, error = summarise(values)
                    cells.append(f"{mean:.3f} ± {error:.3f}")
                else:
                    cells.append("-")
            cells.append(f"{np.mean([r['fit_seconds'] for r in group]):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["pid", "segmentation", "gamma_pi0", "regression"])
    parser.add_argument("--n-labels", type=int, nargs="+", default=[100, 1000], help="labelled training events")
    parser.add_argument("--n-val", type=int, default=None,
                        help="validation events drawn from the pool besides the labels (default: 100; 50 for "
                             "segmentation)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="simulated test events (default: 5000 showers, 300 LArTPC events)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="label-subset seeds")
    parser.add_argument("--models", nargs="+", default=["logistic", "boosted"],
                        help="logistic (pid, gamma_pi0; for regression: the linear model), boosted")
    parser.add_argument("--max-train-points", type=int, default=100_000, help="segmentation: training-point cap")
    parser.add_argument("--gamma-pi0-test-per-class", type=int, default=GAMMA_PI0_TEST_PER_CLASS)
    parser.add_argument("--geant4-dir", default=str(GEANT4_DIR))
    parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads (0: no limit)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/references_TASK.json)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.n_val is None:
        args.n_val = 50 if args.task == "segmentation" else 100
    if args.n_test is None:
        args.n_test = 300 if args.task == "segmentation" else 5000
    args.threads = None if args.threads == 0 else args.threads
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    command, machine = announce()
    start = time.perf_counter()
    rows = run(args)
    print()
    print(table(rows, args.task))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    write_results(f"references_{args.task}", command, machine, rows,
                  args.out or RESULTS_DIR / f"references_{args.task}.json")
    return rows


if __name__ == "__main__":
    main()
