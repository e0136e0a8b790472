"""Judge generated calorimeter showers against a reference sample, CaloChallenge style.

:func:`evaluate` computes, for showers on one cylindrical geometry (cells under the readout
threshold zeroed first, negative cells too):

* the high-level features of :func:`pcfm.evaluation.features.high_level_features`;
* the separation power of every feature's histogram (binning in
  :mod:`pcfm.evaluation.distances`), with its mean and maximum over features;
* the Frechet (FPD) and kernel (KPD) distances of the features, standardised by the reference;
* optionally the classifier two-sample test (:mod:`pcfm.evaluation.classifier`), as a held-out
  ROC AUC on low-level inputs (cells / incident energy and log10 incident energy) and on the
  standardised high-level features;
* optionally a JSON + markdown report and PNG plots (:mod:`pcfm.evaluation.report`, :mod:`pcfm.evaluation.plots`).

The Frechet distance is biased upwards by about (number of features)^2 / (number of showers):
compare numbers only between evaluations with the same sample sizes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pcfm.data.calochallenge import infer_geometry, read_calochallenge
from pcfm.data.events import CaloShowers
from pcfm.errors import DataError, GeometryError
from pcfm.evaluation.classifier import classifier_auc
from pcfm.evaluation.distances import frechet_distance, kernel_distance, separation_powers, standardise
from pcfm.evaluation.features import feature_matrix, high_level_features, low_level_inputs
from pcfm.evaluation.plots import make_plots
from pcfm.evaluation.report import write_report
from pcfm.geometry import get as get_geometry
from pcfm.geometry.cylindrical import CylindricalGeometry

Sample = Union[CaloShowers, str, os.PathLike]


def _load(sample: Sample, geometry) -> tuple[CaloShowers, Optional[Path]]:
    """The showers of ``sample`` and the file they came from (None for in-memory showers)."""
    if isinstance(sample, CaloShowers):
        return sample, None
    return read_calochallenge(sample, geometry), Path(sample)


def _resolve_geometry(geometry, samples: list[tuple[CaloShowers, Optional[Path]]]) -> CylindricalGeometry:
    """The geometry argument, else the one the samples name, else the preset of their cell count."""
    if geometry is None:
        named = [s.geometry for s, _ in samples if s.geometry]
        geometry = named[0] if named else infer_geometry(samples[0][0].showers.shape[1], samples[0][1])
    geometry = get_geometry(geometry)
    if not isinstance(geometry, CylindricalGeometry):
        raise GeometryError(f"evaluation needs a cylindrical calorimeter geometry, got {geometry.name!r} "
                            f"({geometry.kind})")
    for showers, path in samples:
        if showers.showers.shape[1] != geometry.n_cells:
            raise DataError(f"showers have {showers.showers.shape[1]} cells but geometry {geometry.name!r} "
                            f"has {geometry.n_cells}", path)
    return geometry


def _check(showers: CaloShowers, path: Optional[Path], role: str) -> None:
    """Raise DataError naming the first event with a bad incident energy or non-finite cell."""
    if len(showers) < 4:
        raise DataError(f"the {role} sample needs at least 4 showers, got {len(showers)}", path)
    incident = showers.incident_energies
    bad_incident = ~(np.isfinite(incident) & (incident > 0))
    bad_cells = ~np.isfinite(showers.showers).all(axis=1)
    for mask, problem in ((bad_incident, "incident energy must be positive and finite"),
                          (bad_cells, "non-finite cell energy (NaN or inf)")):
        if mask.any():
            event = int(np.argmax(mask))
            raise DataError(f"{role} showers: {problem}", path, event)


def evaluate(generated: Sample, reference: Sample, geometry=None, *, classifier: bool = True,
             plots_dir: Optional[Union[str, os.PathLike]] = None,
             report_path: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
             n_bins: int = 30, classifier_epochs: int = 50, progress: bool = True) -> dict:
    """Compare ``generated`` with ``reference`` showers (CaloShowers or CaloChallenge files).

    Args:
        geometry: name or object; default: the geometry the showers name, else the preset with
            their cell count.
        classifier: run the two classifier tests (the slow part: seconds per thousand showers).
        plots_dir: write PNG plots there (needs matplotlib; skipped with a printed reason if
            absent); the report's own folder keeps report and plots together.
        report_path: write the results as JSON there, and a markdown summary beside it (``.md``)
            that links the plots or says why they were skipped.
        seed: seeds the classifiers, their data split and the kernel-distance batches.
        n_bins: histogram bins of the separation power.
        classifier_epochs: most training epochs of each classifier (it stops early, see
            :mod:`pcfm.evaluation.classifier`).
        progress: print one line as each stage ends (load, features, distances, each
            classifier, plots), with its time.

    Returns:
        A JSON-ready dict: ``geometry``, ``n_generated``, ``n_reference``,
        ``separation_power`` (``mean``, ``max``, ``max_feature``, ``per_feature``), ``fpd``,
        ``kpd`` and ``kpd_std``, ``classifier`` (``low_level`` and ``high_level`` results of
        :func:`~pcfm.evaluation.classifier.classifier_auc`, or None), ``plots`` (written files),
        ``plots_skipped`` (why not, or None) and ``timings_s``.
    """
    timings = {}

    def done(stage: str, seconds: float, what: str = "") -> None:
        timings[stage] = seconds
        if progress:
            print(f"evaluate: {stage}{what} done in {seconds:.1f} s", flush=True)

    start = time.perf_counter()
    samples = [_load(generated, geometry), _load(reference, geometry)]
    geometry = _resolve_geometry(geometry, samples)
    for (showers, path), role in zip(samples, ("generated", "reference")):
        _check(showers, path, role)
    (gen, _), (ref, _) = samples
    done("load", time.perf_counter() - start, f" ({len(gen)} generated, {len(ref)} reference showers)")

    start = time.perf_counter()
    gen_features = high_level_features(gen.showers, gen.incident_energies, geometry)
    ref_features = high_level_features(ref.showers, ref.incident_energies, geometry)
    done("features", time.perf_counter() - start)

    start = time.perf_counter()
    powers = separation_powers(gen_features, ref_features, n_bins)
    gen_std, ref_std = standardise(feature_matrix(gen_features), feature_matrix(ref_features))
    fpd = frechet_distance(gen_std, ref_std)
    kpd, kpd_std = kernel_distance(gen_std, ref_std, seed=seed)
    done("distances", time.perf_counter() - start)

    classifiers = None
    if classifier:
        start = time.perf_counter()
        low = classifier_auc(low_level_inputs(gen.showers, gen.incident_energies, geometry),
                             low_level_inputs(ref.showers, ref.incident_energies, geometry),
                             epochs=classifier_epochs, seed=seed)
        if progress:
            print(f"evaluate: low-level classifier AUC {low['auc']:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
        classifiers = {"low_level": low,
                       "high_level": classifier_auc(gen_std, ref_std, epochs=classifier_epochs, seed=seed)}
        done("classifier", time.perf_counter() - start,
             f" (high-level AUC {classifiers['high_level']['auc']:.3f})")

    worst = max(powers, key=powers.get)
    results = {
        "geometry": geometry.name,
        "n_generated": len(gen),
        "n_reference": len(ref),
        "separation_power": {"mean": float(np.mean(list(powers.values()))), "max": powers[worst],
                             "max_feature": worst, "per_feature": powers},
        "fpd": fpd,
        "kpd": kpd,
        "kpd_std": kpd_std,
        "classifier": classifiers,
        "plots": [],
        "plots_skipped": None,
        "timings_s": timings,
    }
    if plots_dir is not None:
        start = time.perf_counter()
        plots, reason = make_plots(gen, ref, geometry, gen_features, ref_features, powers, Path(plots_dir))
        results["plots"], results["plots_skipped"] = [str(p) for p in plots], reason
        if reason:
            print(f"pcfm.evaluate: plots skipped: {reason}")
        done("plots", time.perf_counter() - start)
    if report_path is not None:
        write_report(results, Path(report_path))
    return results
