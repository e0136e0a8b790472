"""Write evaluation results: a JSON file and a short markdown summary that links the plots
(:mod:`pcfm.evaluation.plots`) or says why they were skipped. Files are written atomically
(:func:`pcfm.io.atomic_path`).

The summary says which numbers can be set beside published CaloChallenge values: only the
JetNet FPD and KPD, and only with at least 10000 showers a side (``comparable``); pcfm's own
FPD and KPD (standardised features, whole samples, cubic kernel) are for comparing pcfm
evaluations of equal sizes with each other. Results written before these keys existed are
summarised without them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pcfm.io import atomic_path
from pcfm.evaluation.plots import PLOT_CAPTIONS, make_plots  # noqa: F401 - make_plots: its home before 0.2


def markdown_summary(results: dict, folder: Path = Path(".")) -> str:
    """A short human-readable summary of :func:`pcfm.evaluate` results; plot links
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
    for key, name in (("fpd_jetnet", "FPD"), ("kpd_jetnet", "KPD")):
        if results.get(key):
            lines.append(f"| {name}, JetNet definition (x 10^3) | {1e3 * results[key]['value']:.4g} "
                         f"+- {1e3 * results[key]['error']:.2g} |")
    if results["classifier"]:
        for level, outcome in results["classifier"].items():
            lines.append(f"| classifier AUC, {level.replace('_', '-')} ({outcome['n_test']} test showers) "
                         f"| {outcome['auc']:.4f} |")
    lines += _comparability(results) + _inputs(results.get("inputs"))
    for warning in results.get("warnings") or []:
        lines += ["", f"Warning: {warning}."]
    worst = sorted(sep["per_feature"].items(), key=lambda item: -item[1])[:10]
    lines += ["", "Features with the largest separation power:", "", "| feature | separation power |",
              "|---|---|", *(f"| {name} | {value:.4f} |" for name, value in worst)]
    if results["plots"] or results["plots_skipped"]:
        lines += ["", "## Plots"]
    for plot in results["plots"]:
        stem = Path(plot).stem
        link = Path(os.path.relpath(Path(plot).resolve(), folder.resolve())).as_posix()
        lines += ["", f"{PLOT_CAPTIONS.get(stem, stem)}:", "", f"![{stem}]({link})"]
    if results["plots_skipped"]:
        lines += ["", f"Plots skipped: {results['plots_skipped']}."]
    return "\n".join(lines) + "\n"


def _comparability(results: dict) -> list[str]:
    """What may be set beside published CaloChallenge values, in words."""
    jetnet = results.get("fpd_jetnet")
    if not jetnet:
        return []
    settings = jetnet["settings"]
    verdict = ("comparable with published CaloChallenge values (same definitions and settings; the features "
               "differ from the official ones only where pcfm's readout threshold zeroes cells)"
               if jetnet["comparable"] else
               f"not comparable with published CaloChallenge values: fewer than 10000 showers a side, so the "
               f"batches were scaled to the samples (FPD from {settings['min_samples']} to "
               f"{settings['max_samples']} showers)")
    return ["", f"JetNet FPD and KPD ({jetnet['n_features']} features: {jetnet['features']}): {verdict}. "
            "pcfm's own FPD and KPD (standardised features, whole samples, cubic kernel) compare only pcfm "
            "evaluations of equal sizes."]


def _inputs(inputs) -> list[str]:
    """Negative cells clipped and empty showers kept, per sample, when there were any."""
    if not inputs:
        return []
    rows = [(role, inputs[role]) for role in ("generated", "reference")
            if inputs[role]["negative_cells"] or inputs[role]["empty_showers"]]
    if not rows:
        return []
    return ["", "| sample | negative cells set to 0 | their energy (MeV) | empty showers kept |", "|---|---|---|---|",
            *(f"| {role} ({counts['source']}) | {counts['negative_cells']} | {counts['negative_energy_mev']:.6g} "
              f"| {counts['empty_showers']} |" for role, counts in rows)]


def write_report(results: dict, path: Path) -> None:
    """``results`` as JSON at ``path`` and the markdown summary at ``path`` with suffix ``.md``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_summary(results, path.parent))
