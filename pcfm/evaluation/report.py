"""Write evaluation results: a JSON file and a short markdown summary that links the plots
(:mod:`pcfm.evaluation.plots`) or says why they were skipped. Files are written atomically
(:func:`pcfm.io.atomic_path`).
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
    if results["classifier"]:
        for level, outcome in results["classifier"].items():
            lines.append(f"| classifier AUC, {level.replace('_', '-')} ({outcome['n_test']} test showers) "
                         f"| {outcome['auc']:.4f} |")
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


def write_report(results: dict, path: Path) -> None:
    """``results`` as JSON at ``path`` and the markdown summary at ``path`` with suffix ``.md``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_summary(results, path.parent))
