"""Write evaluation results: a JSON file, a short markdown summary, and PNG plots.

Plots need matplotlib, which pcfm does not depend on: without it :func:`make_plots` writes
nothing and says why. Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot),
so a user's interactive backend and open figures are left alone. Every file is written atomically (:func:`pcfm.data.atomic.atomic_path`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from pcfm.data.atomic import atomic_path
from pcfm.data.events import CaloShowers
from pcfm.evaluation.distances import histogram_edges
from pcfm.evaluation.features import apply_threshold
from pcfm.geometry.cylindrical import CylindricalGeometry

#: Features shown in the histogram figure: the ones with the largest separation power.
N_FEATURE_PLOTS = 12


def markdown_summary(results: dict, folder: Path = Path(".")) -> str:
    """A short human-readable summary of :func:`pcfm.evaluate.evaluate` results; plot links
    are relative to ``folder``, where the summary is written."""
    sep = results["separation_power"]
    lines = [
        f"# Shower evaluation on {results['geometry']}",
        "",
        f"{results['n_generated']} generated vs {results['n_reference']} reference showers.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| separation power, mean over features | {sep['mean']:.4f} |",
        f"| separation power, max ({sep['max_feature']}) | {sep['max']:.4f} |",
        f"| FPD (standardised high-level features) | {results['fpd']:.4g} |",
        f"| KPD | {results['kpd']:.4g} +- {results['kpd_std']:.2g} |",
    ]
    if results["classifier"]:
        for level, outcome in results["classifier"].items():
            lines.append(f"| classifier AUC, {level.replace('_', '-')} ({outcome['n_test']} test showers) "
                         f"| {outcome['auc']:.4f} |")
    worst = sorted(sep["per_feature"].items(), key=lambda item: -item[1])[:10]
    lines += ["", "Features with the largest separation power:", "", "| feature | separation power |",
              "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in worst)]
    if results["plots"]:
        lines += ["", *(f"![{Path(p).stem}]({Path(os.path.relpath(Path(p).resolve(), folder.resolve())).as_posix()})"
                        for p in results["plots"])]
    elif results["plots_skipped"]:
        lines += ["", f"Plots skipped: {results['plots_skipped']}."]
    return "\n".join(lines) + "\n"


def write_report(results: dict, path: Path) -> None:
    """``results`` as JSON at ``path`` and the markdown summary at ``path`` with suffix ``.md``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_summary(results, path.parent))


def _ratio_panel(axes, x, generated: np.ndarray, reference: np.ndarray) -> None:
    ratio = np.divide(generated, reference, out=np.full_like(generated, np.nan), where=reference > 0)
    axes.plot(x, ratio, "o-", color="C1", markersize=3)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_ylabel("gen / ref")
    axes.set_ylim(0.5, 1.5)


def _profile_figure(Figure, x, generated, reference, xlabel: str, ylabel: str, path: Path) -> Path:
    """Two profiles with a ratio panel below, saved as PNG."""
    fig = Figure(figsize=(6, 5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(x, reference, "o-", color="black", markersize=3, label="reference")
    top.plot(x, generated, "s--", color="C1", markersize=3, label="generated")
    top.set_yscale("log")
    top.set_ylabel(ylabel)
    top.legend()
    _ratio_panel(bottom, x, generated, reference)
    bottom.set_xlabel(xlabel)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _mean_radial_profile(showers: CaloShowers, geometry: CylindricalGeometry, radii: np.ndarray,
                         ring_index: np.ndarray) -> np.ndarray:
    """Mean energy per shower at each distinct cell-centre radius (summed over layers and angles;
    on irregular geometries each radius collects the layers that have a cell centred there)."""
    mean_cells = apply_threshold(showers.showers, geometry).mean(axis=0)
    return np.bincount(ring_index, weights=mean_cells, minlength=len(radii))


def make_plots(generated: CaloShowers, reference: CaloShowers, geometry: CylindricalGeometry,
               gen_features: dict, ref_features: dict, powers: dict, plots_dir: Path) -> tuple[list[Path], Optional[str]]:
    """Mean longitudinal and radial profiles (with ratio panels), total energy response and the
    histograms of the features that separate most. Returns (files written, reason if skipped)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib to get plots)"
    plots_dir.mkdir(parents=True, exist_ok=True)
    layer_names = [f"layer{i}_energy" for i in geometry.layer_ids]
    written = [_profile_figure(
        Figure, geometry.layer_ids, np.array([gen_features[n].mean() for n in layer_names]),
        np.array([ref_features[n].mean() for n in layer_names]), "layer id", "mean energy per shower (MeV)",
        plots_dir / "longitudinal_profile.png")]

    radii, ring_index = np.unique(np.round(geometry.cylindrical()[:, 0], 6), return_inverse=True)
    written.append(_profile_figure(
        Figure, radii, _mean_radial_profile(generated, geometry, radii, ring_index),
        _mean_radial_profile(reference, geometry, radii, ring_index), "cell centre radius r (mm)",
        "mean energy per shower (MeV)", plots_dir / "radial_profile.png"))

    fig = Figure(figsize=(6, 4))
    axes = fig.subplots()
    edges = histogram_edges(ref_features["energy_ratio"], 50)
    for features, style, label in ((ref_features, "black", "reference"), (gen_features, "C1", "generated")):
        axes.hist(np.clip(features["energy_ratio"], edges[0], edges[-1]), bins=edges, density=True,
                  histtype="step", color=style, label=label)
    axes.set_xlabel("total energy / incident energy")
    axes.set_ylabel("density")
    axes.legend()
    written.append(_save(fig, plots_dir / "energy_response.png"))

    shown = sorted(powers, key=lambda n: -powers[n])[:N_FEATURE_PLOTS]
    columns = 4
    rows = -(-len(shown) // columns)
    fig = Figure(figsize=(4 * columns, 3 * rows))
    grid = fig.subplots(rows, columns, squeeze=False)
    for axes, name in zip(grid.ravel(), shown):
        edges = histogram_edges(ref_features[name], 30)
        for features, style in ((ref_features, "black"), (gen_features, "C1")):
            axes.hist(np.clip(features[name], edges[0], edges[-1]), bins=edges, density=True,
                      histtype="step", color=style)
        axes.set_title(f"{name}  (sep. {powers[name]:.3f})", fontsize=8)
    for axes in grid.ravel()[len(shown):]:
        axes.set_visible(False)
    written.append(_save(fig, plots_dir / "feature_histograms.png"))
    return written, None
