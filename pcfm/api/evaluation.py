"""Judge generated calorimeter showers against a reference sample, CaloChallenge style.

:func:`evaluate` computes, for showers on one cylindrical geometry (cells under the readout
threshold zeroed first, negative cells too):

* the high-level features of :func:`pcfm.evaluation.features.high_level_features`;
* the separation power of every feature's histogram (binning in
  :mod:`pcfm.evaluation.distances`), with its mean and maximum over features;
* the Frechet (FPD) and kernel (KPD) distances of the features, standardised by the reference
  (pcfm's own: ``fpd``, ``kpd``);
* FPD and KPD as JetNet defines them and the CaloChallenge evaluation reports them
  (``fpd_jetnet``, ``kpd_jetnet``: FPD extrapolated to infinitely many showers, KPD with JetNet's
  kernel and batches, both on the CaloChallenge high-level classifier inputs; see
  :mod:`pcfm.evaluation.distances`), comparable with published values only with at least 10000
  showers a side (``comparable``);
* optionally the classifier two-sample test (:mod:`pcfm.evaluation.classifier`), as a held-out
  ROC AUC on low-level inputs (cells / incident energy and log10 incident energy) and on the
  standardised high-level features;
* optionally a JSON + markdown report and PNG plots (:mod:`pcfm.evaluation.report`, :mod:`pcfm.evaluation.plots`).

The Frechet distance is biased upwards by about (number of features)^2 / (number of showers):
compare numbers only between evaluations with the same sample sizes. Samples of fewer showers
than features plus one still give finite numbers, with a warning in the results.

Files that the CaloChallenge evaluation accepts but pcfm's reader refuses (a negative cell,
an all-zero shower) are read with ``clip_negative`` (negative cells set to 0) and
``keep_empty`` (empty showers kept: their features are all 0); ``inputs`` in the results
counts what was clipped and kept. In-memory showers are accepted with both (their negative
cells are zeroed by the features either way, and in the showers too with ``clip_negative``).

Why one module of this length: the verb, its checks of the two samples (geometry, sizes, values)
and the lenient reading behind ``clip_negative`` / ``keep_empty`` decide together what is
compared; the computations live in :mod:`pcfm.evaluation`.

Both samples must be showers of one detector: files that name different geometries (or a
``geometry`` argument that contradicts a file) are refused unless ``allow_geometry_mismatch``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pcfm.data.calochallenge import (GEOMETRY_BY_VOXELS, MAX_ENERGY_MEV, block_events_for, file_geometry,
                                     find_bad_events, infer_geometry, inspect_file, read_block)
from pcfm.data.hdf5 import open_hdf5, read_errors
from pcfm.data.events import CaloShowers
from pcfm.errors import DataError, GeometryError
from pcfm.evaluation.classifier import classifier_auc
from pcfm.evaluation.distances import (CALOCHALLENGE_MIN_SHOWERS, JETNET_SEED, MIN_SHOWERS,
                                      calochallenge_distance_inputs, frechet_distance,
                                      frechet_distance_extrapolated, jetnet_settings, kernel_distance,
                                      kernel_distance_jetnet, separation_powers, small_sample_warning,
                                      standardise)
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


def _negative_and_empty(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells with negative values set to 0, negative values where cells were negative and 0
    elsewhere, mask of showers with no non-zero cell once clipped). -inf and NaN are left to
    the reader's checks (non-finite), not clipped."""
    negative = np.where(np.isfinite(cells) & (cells < 0), cells, 0)
    clipped = cells - negative if np.any(negative) else cells
    return clipped, negative, ~np.any(clipped != 0, axis=1)


#: How to accept what the CaloChallenge evaluation accepts, appended to pcfm's refusals.
_CLIP_HINT = ("; pass clip_negative=True (pcfm evaluate --clip-negative) to set negative cells to 0, as the "
              "CaloChallenge evaluation accepts them")
_KEEP_HINT = ("; pass keep_empty=True (pcfm evaluate --keep-empty) to keep empty showers (their features are 0), "
              "as the CaloChallenge evaluation does")


def _read_file(path: Path, geometry, clip_negative: bool, keep_empty: bool) -> tuple[CaloShowers, dict]:
    """A CaloChallenge file read and checked as :func:`~pcfm.data.calochallenge.read_calochallenge`
    does, block by block, except that negative cells are set to 0 (``clip_negative``) and
    all-zero showers kept (``keep_empty``) instead of refused; the first bad event raises a
    DataError naming the file and the event, with the option that would accept it. Returns
    the showers (float32, as the reader's) and what was clipped and kept."""
    with open_hdf5(path) as h5file, read_errors(path):
        layout = inspect_file(h5file, path, geometry)
        incident_out = np.empty(layout.n_events, dtype=np.float32)
        showers_out = np.empty((layout.n_events, layout.n_voxels), dtype=np.float32)
        negative_cells, negative_energy, empty_showers = 0, 0.0, 0
        block = block_events_for(layout.n_voxels)
        for a in range(0, layout.n_events, block):
            b = min(a + block, layout.n_events)
            with read_errors(path, a if b - a == 1 else None):
                incident, showers, extras = read_block(h5file, layout, a, b)
            clipped, negative, empty = _negative_and_empty(showers)
            # the reader's other checks, with negative cells and emptiness taken out of their way
            checked = clipped
            if empty.any():
                checked = clipped.copy()
                checked[empty, 0] = 1.0
            problems = dict(find_bad_events(incident, checked, extras, first_event=a))
            if not clip_negative:
                for k in np.flatnonzero(negative.any(axis=1)):
                    problems.setdefault(a + int(k), f"negative cell energy {negative[k].min():.6g} MeV in cell "
                                                    f"{int(np.argmin(negative[k]))}{_CLIP_HINT}")
            if not keep_empty:
                for k in np.flatnonzero(empty):
                    cleared = " once its negative cells are set to 0" if negative[k].any() else ""
                    problems.setdefault(a + int(k), f"empty shower: all {layout.n_voxels} cells are zero"
                                                    f"{cleared}{_KEEP_HINT}")
            if problems:
                event = min(problems)
                raise DataError(problems[event], path, event)
            incident_out[a:b] = incident
            showers_out[a:b] = clipped
            negative_cells += int(np.count_nonzero(negative))
            negative_energy += float(negative.sum())
            empty_showers += int(np.count_nonzero(empty))
    counts = {"source": str(path), "negative_cells": negative_cells, "negative_energy_mev": negative_energy,
              "empty_showers": empty_showers}
    return CaloShowers(incident_out, showers_out, layout.geometry.name), counts


def _load(sample: Sample, geometry, clip_negative: bool = False,
          keep_empty: bool = False) -> tuple[CaloShowers, Optional[Path], dict]:
    """The showers of ``sample``, the file they came from (None for in-memory showers) and the
    counts of negative cells and empty showers (:func:`_read_file`). In-memory showers keep
    their negative cells (the features zero them) unless ``clip_negative``."""
    if not isinstance(sample, CaloShowers):
        showers, counts = _read_file(Path(sample), geometry, clip_negative, keep_empty)
        return showers, Path(sample), counts
    counts = {"source": "in memory", "negative_cells": 0, "negative_energy_mev": 0.0, "empty_showers": 0}
    cells = sample.showers
    block = block_events_for(cells.shape[1])
    for a in range(0, len(cells), block):  # in blocks: no second copy of a large sample
        _, negative, empty = _negative_and_empty(np.asarray(cells[a:a + block]))
        counts["negative_cells"] += int(np.count_nonzero(negative))
        counts["negative_energy_mev"] += float(negative.sum())
        counts["empty_showers"] += int(np.count_nonzero(empty))
    if clip_negative and counts["negative_cells"]:
        clipped = np.where(np.isfinite(cells) & (cells < 0), 0, cells)
        sample = CaloShowers(sample.incident_energies, clipped, sample.geometry, sample.theta, sample.phi,
                             sample.particle)
    return sample, None, counts


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


def _input_warnings(inputs: dict) -> list[str]:
    """Sentences on the cells clipped and the empty showers kept, per sample."""
    warnings = []
    for role in ("generated", "reference"):
        counts = inputs[role]
        if counts["negative_cells"]:  # a file's only with clip_negative, else it was refused
            warnings.append(f"{role} showers: {counts['negative_cells']} negative cells (summing to "
                            f"{counts['negative_energy_mev']:.6g} MeV) counted as 0")
        if counts["empty_showers"]:
            warnings.append(f"{role} showers: {counts['empty_showers']} empty showers (no non-zero cell) kept, "
                            "their features 0")
    return warnings


#: What the JetNet distances are computed on, in words (the report says it).
JETNET_FEATURES = ("CaloChallenge high-level classifier inputs: log10 E_inc, log10(E_layer + 1e-8), x/y centres "
                   "and widths / 100 (layers binned in angle), log10(E_tot + 1e-8), sparsity (share of zero "
                   "cells), r centres and widths / 100; from pcfm's features (cells under the readout threshold "
                   "zeroed), normalised by the reference's largest |value|")


def _jetnet_distances(gen_features: dict, ref_features: dict, gen_incident: np.ndarray, ref_incident: np.ndarray,
                      geometry: CylindricalGeometry, seed: int) -> tuple[dict, Optional[str]]:
    """``fpd_jetnet`` and ``kpd_jetnet`` results (see :func:`evaluate`) and a warning when the
    samples are too small for the CaloChallenge settings."""
    angular = [layer.id for layer in geometry.layers if layer.n_alpha > 1]
    gen_inputs, ref_inputs = (calochallenge_distance_inputs(f, e, geometry.layer_ids, angular)
                              for f, e in ((gen_features, gen_incident), (ref_features, ref_incident)))
    fpd_settings, kpd_settings, comparable = jetnet_settings(len(gen_inputs), len(ref_inputs))
    fpd_settings["seed"] = kpd_settings["seed"] = JETNET_SEED + seed
    fpd = frechet_distance_extrapolated(gen_inputs, ref_inputs, **fpd_settings)
    kpd = kernel_distance_jetnet(gen_inputs, ref_inputs, **kpd_settings)
    common = {"features": JETNET_FEATURES, "n_features": int(gen_inputs.shape[1]), "comparable": comparable}
    results = {"fpd_jetnet": {"value": fpd[0], "error": fpd[1], **common, "settings": fpd_settings},
               "kpd_jetnet": {"value": kpd[0], "error": kpd[1], **common, "settings": dict(kpd_settings, degree=4)}}
    warning = None if comparable else (
        f"JetNet FPD and KPD on {len(gen_inputs)} generated and {len(ref_inputs)} reference showers: the "
        f"CaloChallenge evaluation uses at least {CALOCHALLENGE_MIN_SHOWERS} a side (FPD batches of "
        f"{CALOCHALLENGE_MIN_SHOWERS} to 50000 showers, KPD batches of {CALOCHALLENGE_MIN_SHOWERS}); pcfm scaled "
        f"the batches to the samples, so these values are not comparable with published ones")
    return results, warning


def evaluate(generated: Sample, reference: Sample, geometry=None, *, allow_geometry_mismatch: bool = False,
             clip_negative: bool = False, keep_empty: bool = False, classifier: bool = True,
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
        clip_negative: read files with negative cells (a generator's -1e-6 MeV, which the
            CaloChallenge evaluation accepts) by setting those cells to 0; without it such a
            file is refused naming the event. In-memory showers: their negative cells are set
            to 0 too (the features ignore them either way).
        keep_empty: read files with all-zero showers (refused without it) and keep them: their
            features are 0 (log-scaled ones log10(1e-8)).
        classifier: run the two classifier tests (the slow part: seconds per thousand showers).
        plots_dir: write PNG plots there (needs matplotlib; skipped with a printed reason if
            absent); the report's own folder keeps report and plots together.
        report_path: write the results as JSON there, and a markdown summary beside it (``.md``)
            that links the plots or says why they were skipped.
        seed: seeds the classifiers, their data split and the kernel-distance batches; the JetNet
            distances are seeded with 42 + seed (JetNet's default 42 at the default 0).
        n_bins: histogram bins of the separation power.
        classifier_epochs: most training epochs of each classifier (it stops early, see
            :mod:`pcfm.evaluation.classifier`).
        progress: print one line as each stage ends (load, features, distances, each
            classifier, plots), with its time.

    Returns:
        A JSON-ready dict: ``geometry``, ``n_generated``, ``n_reference``,
        ``separation_power`` (``mean``, ``max``, ``max_feature``, ``per_feature``), ``fpd``,
        ``kpd`` and ``kpd_std`` (pcfm's definitions), ``fpd_jetnet`` and ``kpd_jetnet`` (JetNet's:
        ``value``, ``error``, ``features``, ``n_features``, ``settings``, ``comparable``: whether
        the samples and settings are those of published CaloChallenge values), ``inputs``
        (``clip_negative``, ``keep_empty`` and, per sample, ``source``, ``negative_cells``,
        ``negative_energy_mev`` (their sum, <= 0), ``empty_showers``), ``classifier``
        (``low_level`` and ``high_level`` results of
        :func:`~pcfm.evaluation.classifier.classifier_auc`, or None), ``plots`` (written files),
        ``plots_skipped`` (why not, or None), ``warnings`` (sentences: samples too small for
        a full-rank FPD, too few showers for JetNet distances comparable with published ones,
        a geometry mismatch allowed, cells clipped or empty showers kept) and ``timings_s``.

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
    loaded = [_load(sample, geometry or read_as, clip_negative, keep_empty) for sample in (generated, reference)]
    samples = [(showers, path) for showers, path, _ in loaded]
    geometry = _resolve_geometry(geometry or read_as, samples)
    for (showers, path), role in zip(samples, ("generated", "reference")):
        _check(showers, path, role)
    (gen, _), (ref, _) = samples
    inputs = {"clip_negative": clip_negative, "keep_empty": keep_empty,
              "generated": loaded[0][2], "reference": loaded[1][2]}
    warnings += _input_warnings(inputs)
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

    start = time.perf_counter()
    jetnet, jetnet_warning = _jetnet_distances(gen_features, ref_features, gen.incident_energies,
                                               ref.incident_energies, geometry, seed)
    if jetnet_warning:
        warnings.append(jetnet_warning)
    done("jetnet_distances", time.perf_counter() - start,
         f" (FPD {jetnet['fpd_jetnet']['value']:.4g}, KPD {jetnet['kpd_jetnet']['value']:.4g})")

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
        **jetnet,
        "inputs": inputs,
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
