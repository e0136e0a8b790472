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
compare numbers only between evaluations with the same sample sizes. Samples of fewer showers
than features plus one still give finite numbers, with a warning in the results.

Both samples must be showers of one detector: files that name different geometries (or a
``geometry`` argument that contradicts a file) are refused unless ``allow_geometry_mismatch``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pcfm.data.calochallenge import (GEOMETRY_BY_VOXELS, MAX_ENERGY_MEV, file_geometry, infer_geometry,
                                     read_calochallenge)
from pcfm.data.events import CaloShowers
from pcfm.errors import DataError, GeometryError
from pcfm.evaluation.classifier import classifier_auc
from pcfm.evaluation.distances import (MIN_SHOWERS, frechet_distance, kernel_distance, separation_powers,
                                      small_sample_warning, standardise)
from pcfm.evaluation.features import feature_matrix, high_level_features, low_level_inputs
from pcfm.evaluation.plots import make_plots
from pcfm.evaluation.report import write_report
from pcfm.geometry import get as get_geometry
from pcfm.geometry.cylindrical import CylindricalGeometry

Sample = Union[CaloShowers, str, os.PathLike]


def _named_geometry(sample: Sample) -> tuple[Optional[str], Optional[str]]:
    """(the geometry ``sample`` names, the one its cell count implies): a file's ``geometry``
    attribute or the showers' ``geometry``, and the preset read by default
    (:data:`~pcfm.data.calochallenge.GEOMETRY_BY_VOXELS`), each None when there is none."""
    if isinstance(sample, CaloShowers):
        return sample.geometry, GEOMETRY_BY_VOXELS.get(sample.showers.shape[1])
    return file_geometry(sample)


def _where(sample: Sample) -> str:
    return "in memory" if isinstance(sample, CaloShowers) else str(sample)


def _check_geometries(generated: Sample, reference: Sample, geometry,
                      allow_mismatch: bool) -> tuple[Optional[str], Optional[str]]:
    """Refuse samples that name different geometries, or a ``geometry`` that contradicts one
    (features of one detector's cells read as another's are meaningless). Returns the geometry
    to read both with when a mismatch is allowed and none is given (else None), and a warning
    when a mismatch is allowed."""
    samples = {"generated": generated, "reference": reference}
    named = {role: _named_geometry(sample) for role, sample in samples.items()}
    override = "pass allow_geometry_mismatch=True (pcfm evaluate --allow-geometry-mismatch) to evaluate anyway"
    if geometry is not None:
        name = _cylindrical(get_geometry(geometry)).name
        for role, (attribute, _) in named.items():
            if attribute is not None and attribute != name:
                problem = (f"geometry {name!r} contradicts the {role} showers ({_where(samples[role])}), "
                           f"which name geometry {attribute!r}")
                if not allow_mismatch:
                    raise GeometryError(f"{problem}; {override} as {name!r}")
                return None, f"{problem}; evaluated as {name!r} (allow_geometry_mismatch)"
        return None, None
    (gen_named, gen_implied), (ref_named, ref_implied) = named.values()
    gen_geometry, ref_geometry = gen_named or gen_implied, ref_named or ref_implied
    if gen_geometry is None or ref_geometry is None or gen_geometry == ref_geometry:
        return None, None
    how = lambda named_: "name" if named_ else "are read by default (by their cell count) as"  # noqa: E731
    problem = (f"the generated showers ({_where(generated)}) {how(gen_named)} geometry {gen_geometry!r} but the "
               f"reference showers ({_where(reference)}) {how(ref_named)} {ref_geometry!r}")
    if not allow_mismatch:
        unnamed = "" if gen_named and ref_named else "give geometry= (--geometry) to say what unnamed showers are, or "
        raise GeometryError(f"{problem}: different detectors; {unnamed}{override} as the reference's "
                            f"{ref_geometry!r}")
    return ref_geometry, f"{problem}; both evaluated as {ref_geometry!r} (allow_geometry_mismatch)"


def _cylindrical(geometry) -> CylindricalGeometry:
    if not isinstance(geometry, CylindricalGeometry):
        raise GeometryError(f"evaluation needs a cylindrical calorimeter geometry, got {geometry.name!r} "
                            f"({geometry.kind})")
    return geometry


def _load(sample: Sample, geometry) -> tuple[CaloShowers, Optional[Path]]:
    """The showers of ``sample`` and the file they came from (None for in-memory showers)."""
    if isinstance(sample, CaloShowers):
        return sample, None
    return read_calochallenge(sample, geometry), Path(sample)


def _resolve_geometry(geometry, samples: list[tuple[CaloShowers, Optional[Path]]]) -> CylindricalGeometry:
    """The geometry argument, else the one the reference (then the generated) showers name,
    else the preset of their cell count."""
    if geometry is None:
        named = [s.geometry for s, _ in reversed(samples) if s.geometry]
        geometry = named[0] if named else infer_geometry(samples[0][0].showers.shape[1], samples[0][1])
    geometry = _cylindrical(get_geometry(geometry))
    for showers, path in samples:
        if showers.showers.shape[1] != geometry.n_cells:
            raise DataError(f"showers have {showers.showers.shape[1]} cells but geometry {geometry.name!r} "
                            f"has {geometry.n_cells}", path)
    return geometry


def _check(showers: CaloShowers, path: Optional[Path], role: str) -> None:
    """Raise DataError naming the first event with a bad incident energy or cell energy (cells
    above :data:`MAX_ENERGY_MEV` only in the reference)."""
    if len(showers) < MIN_SHOWERS:
        raise DataError(f"too few showers: the {role} sample needs at least {MIN_SHOWERS} showers, "
                        f"got {len(showers)}", path)
    incident = showers.incident_energies
    bad_incident = ~(np.isfinite(incident) & (incident > 0) & (incident <= MAX_ENERGY_MEV))
    bad_cells = ~np.isfinite(showers.showers).all(axis=1)
    # A generated cell above 10 TeV is the model's output, to be judged (it shows in every
    # distance); a reference cell there is a broken file.
    too_high = (showers.showers > MAX_ENERGY_MEV).any(axis=1) & (role == "reference")
    for mask, problem in ((bad_incident, f"incident energy must be positive, finite and at most "
                                         f"{MAX_ENERGY_MEV:.0e} MeV"),
                          (bad_cells, "non-finite cell energy (NaN or inf)"),
                          (too_high, f"cell energy above {MAX_ENERGY_MEV:.0e} MeV (10 TeV), out of range")):
        if mask.any():
            event = int(np.argmax(mask))
            raise DataError(f"{role} showers: {problem}", path, event)


def evaluate(generated: Sample, reference: Sample, geometry=None, *, allow_geometry_mismatch: bool = False,
             classifier: bool = True,
             plots_dir: Optional[Union[str, os.PathLike]] = None,
             report_path: Optional[Union[str, os.PathLike]] = None, seed: int = 0,
             n_bins: int = 30, classifier_epochs: int = 50, progress: bool = True) -> dict:
    """Compare ``generated`` with ``reference`` showers (CaloShowers or CaloChallenge files).

    Args:
        geometry: name or object; default: the geometry the showers name, else the preset with
            their cell count.
        allow_geometry_mismatch: evaluate even when the two samples name (or are read by
            default as) different geometries, or ``geometry`` contradicts the one a sample
            names; both are then read as ``geometry``, else as the reference's. Without it
            such a call raises a GeometryError naming both samples and their geometries
            (``calochallenge-ds2`` and ``par04-scipb`` share 6480 cells, so nothing else tells).
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
        ``plots_skipped`` (why not, or None), ``warnings`` (sentences: samples too small for
        a full-rank FPD, a geometry mismatch allowed) and ``timings_s``.

    Each sample needs at least :data:`~pcfm.evaluation.distances.MIN_SHOWERS` (4) showers; with
    fewer showers than features plus one (363 on dataset 2) the distances are finite but
    dominated by small-sample bias, and ``warnings`` says so.
    """
    timings = {}

    def done(stage: str, seconds: float, what: str = "") -> None:
        timings[stage] = seconds
        if progress:
            print(f"evaluate: {stage}{what} done in {seconds:.1f} s", flush=True)

    start = time.perf_counter()
    read_as, mismatch = _check_geometries(generated, reference, geometry, allow_geometry_mismatch)
    warnings = [mismatch] if mismatch else []
    samples = [_load(generated, geometry or read_as), _load(reference, geometry or read_as)]
    geometry = _resolve_geometry(geometry or read_as, samples)
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
    small = small_sample_warning(len(gen), len(ref), gen_std.shape[1])
    if small:
        warnings.append(small)
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

    if progress:
        for warning in warnings:
            print(f"evaluate: warning: {warning}", flush=True)
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
        "warnings": warnings,
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
