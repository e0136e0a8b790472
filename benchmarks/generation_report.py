"""The plots, the markdown report and the target checks of benchmarks/generation.py.

Separate from generation.py so that the script holds the parts and the command line; these read
only the result rows and the config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from _common import fmt, markdown_table, save_png
from generation_config import (REPEAT_BELOW_S, SOURCE_GEOMETRY, TARGET_AUC, TARGET_FPD_RATIO, TARGET_HIGH_LEVEL_AUC,
                               TARGET_MS_PER_SHOWER, UNUSABLE_FPD_FACTOR, Config, Sampler, row_sampler)


def make_plots(rows: list[dict], plots: Path) -> tuple[list[str], Optional[str]]:
    """FPD against n for the adaptation arms, showers/s against batch size; PNG files written."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return [], "matplotlib is not installed"
    written = []
    adaptation = [r for r in rows if r.get("part") == "adaptation" and r.get("arm") in ("pretrained", "scratch")]
    if adaptation:
        fig = Figure(figsize=(5.5, 4))
        axes = fig.subplots()
        for arm, colour in (("pretrained", "C0"), ("scratch", "C1")):
            ns = sorted({r["n"] for r in adaptation if r["arm"] == arm})
            values = [[r["fpd"] for r in adaptation if r["arm"] == arm and r["n"] == n] for n in ns]
            means = [np.mean(v) for v in values]
            spread = np.array([[m - min(v), max(v) - m] for m, v in zip(means, values)]).T
            axes.errorbar(ns, means, yerr=spread, fmt="o-", color=colour, capsize=3,
                          label=f"{arm} ({'from ds2' if arm == 'pretrained' else 'random init'})")
        ideal = [r["fpd"] for r in rows if r.get("part") == "adaptation" and str(r.get("arm")).startswith("ideal")]
        if ideal:
            axes.axhline(ideal[0], color="grey", linestyle="--", label="simulator vs simulator")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("target-geometry training showers")
        axes.set_ylabel("FPD vs target reference")
        axes.legend()
        written.append(save_png(fig, plots / "adaptation_fpd.png"))
    speed = [r for r in rows if r.get("part") == "speed" and r.get("showers_per_s")]
    if speed:
        fig = Figure(figsize=(5.5, 4))
        axes = fig.subplots()
        for key in sorted({(r["device"], r["precision"], row_sampler(r).slug) for r in speed}):
            same = [r for r in speed if (r["device"], r["precision"], row_sampler(r).slug) == key]
            points = sorted((r["batch"], r["showers_per_s"]) for r in same)
            axes.plot(*zip(*points), "o-", label=f"{key[0]} {key[1]}, {row_sampler(same[0]).label}")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("batch size (showers)")
        axes.set_ylabel("showers / s")
        axes.legend(fontsize=8)
        written.append(save_png(fig, plots / "speed.png"))
    return written, None


QUALITY_COLUMNS = [("sample", "sample", ""), ("showers", "n_generated", "d"), ("AUC low-level", "auc_low_level", ".3f"),
                   ("AUC high-level", "auc_high_level", ".3f"), ("sep. power mean", "separation_power_mean", ".4f"),
                   ("sep. power max", "separation_power_max", ".3f"), ("FPD", "fpd", ".4g"), ("KPD", "kpd", ".3g"),
                   ("gen. s", "generate_seconds", ".1f")]
ADAPT_COLUMNS = [("arm", "arm", ""), ("n", "n", "d"), ("seed", "seed", "d"), ("FPD", "fpd", ".4g"),
                 ("AUC low-level", "auc_low_level", ".3f"), ("AUC high-level", "auc_high_level", ".3f"),
                 ("sep. power mean", "separation_power_mean", ".4f"), ("final loss", "final_loss", ".3f"),
                 ("train s", "train_seconds", ".0f")]
RATIO_COLUMNS = [("n", "n", "d"), ("FPD pretrained", "fpd_pretrained_mean", ".4g"),
                 ("FPD scratch", "fpd_scratch_mean", ".4g"), ("ratio", "fpd_ratio", ".3f"),
                 ("<= 0.7", "meets_target", "")]
SPEED_COLUMNS = [("device", "device", ""), ("precision", "precision", ""), ("sampler", "sampler", ""),
                 ("steps", "sampler_steps", "d"),
                 ("network calls", "network_calls", "d"), ("batch asked", "batch_requested", "d"),
                 ("batch run", "batch", "d"), ("showers/s", "showers_per_s", ".3g"),
                 ("ms/shower", "ms_per_shower", ".3g"),
                 ("of which deposition ms", "deposit_ms_per_shower", ".3g"), ("points/shower", "mean_points", ".0f")]


def speed_setting(row: dict) -> str:
    """``Heun 20 steps, batch 100`` of a speed row, as far as the row says."""
    parts = [row_sampler(row).label] if row.get("sampler") else []
    if row.get("batch_requested"):
        parts.append(f"batch {row['batch_requested']}")
    return ", ".join(parts)


def report(rows: list[dict], config_name: str, config: Config, command: str, machine: dict, folder: Path) -> str:
    summary = next((r for r in rows if r.get("part") == "summary"), {})
    lines = ["## Shower generation (`benchmarks/generation.py`)", "",
             f"`{command}` — {machine.get('gpu', machine.get('cpu'))}, {machine.get('threads')} threads, "
             f"torch {machine.get('torch')}, kNN backend {machine.get('knn_backend')}; config `{config_name}`, "
             f"model {json.dumps(config.model)}; {summary.get('total_wall_s', 0):.0f} s in all.", "",
             f"Electrons, incident energies log-uniform {config.energy_range[0] / 1e3:g} GeV - "
             f"{config.energy_range[1] / 1e3:g} GeV, normal incidence; simulated by `pcfm.sim` (no Geant4).", ""]
    if config_name != "gpu":
        lines += ["**Not the target configuration (an H100 run of `--config gpu`): these numbers test the "
                  "script and give CPU figures.**", ""]
    quality = [r for r in rows if r.get("part") == "quality"]
    if quality:
        trained = quality[0]
        lines += [f"### Quality on {SOURCE_GEOMETRY}", "",
                  f"Diffusion model trained {trained.get('train_steps')} steps on {config.n_train} showers "
                  f"({trained.get('train_seconds', 0):.0f} s, loss {fmt(trained.get('first_loss'))} -> "
                  f"{fmt(trained.get('final_loss'))}); reference and ideal samples: {config.n_reference} showers "
                  f"each, independent seeds. Target: low-level AUC < {TARGET_AUC}.", "",
                  markdown_table(quality, QUALITY_COLUMNS), ""]
        for row in quality:
            for plot in row.get("plots") or []:
                lines.append(f"![{Path(plot).stem}]({os.path.relpath(plot, folder)})")
        lines.append("")
    adaptation = [r for r in rows if r.get("part") == "adaptation"]
    if adaptation:
        lines += [f"### Geometry adaptation {SOURCE_GEOMETRY} -> {config.target_geometry}", "",
                  f"Both arms: the same n showers, {config.adapt_steps} steps, lr {config.lr:g}, batches of "
                  f"{config.adapt_batch_points} points; judged on {config.n_target_reference} reference showers, "
                  f"{Sampler.parse(config.adapt_sampler).label}. FPD is biased upwards at small samples "
                  f"(the ideal row shows the floor).", "",
                  markdown_table([r for r in adaptation if r.get("fpd") is not None], ADAPT_COLUMNS), "",
                  markdown_table([r for r in adaptation if r.get("arm", "").startswith("ratio")], RATIO_COLUMNS), ""]
    speed = [r for r in rows if r.get("part") == "speed"]
    if speed:
        lines += ["### Speed", "",
                  "Wall time of `pcfm.generate` (sampling, deposition on the ds2 cells, conversion) after a "
                  f"warm-up; the deposition share measured apart. Best of up to {config.speed_repeats} runs when "
                  f"a run is shorter than {REPEAT_BELOW_S:g} s. "
                  f"Target: <= {TARGET_MS_PER_SHOWER} ms/shower at batch 100 on an H100. No distilled sampler "
                  "exists: every row is a deterministic ODE solver on the trained model.", "",
                  markdown_table([r for r in speed if r.get("batch")], SPEED_COLUMNS), ""]
        lines += [f"- {r['device']} {r.get('precision', '')} {speed_setting(r)}: {r['note']}"
                  for r in speed if r.get("note")]
        lines.append("")
    plots = summary.get("plots") or []
    lines += [f"![{Path(p).stem}]({os.path.relpath(p, folder)})" for p in plots]
    if summary.get("plots_skipped"):
        lines.append(f"Plots skipped: {summary['plots_skipped']}.")
    if summary.get("targets"):
        lines += ["", "Targets (issue 6, H100):", ""]
        lines += [f"- {name}: {value}" for name, value in summary["targets"].items()]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> dict:
    """Each target with the measured value and whether it is met (None: not measured here)."""
    out = {}
    quality = [r for r in rows if r.get("part") == "quality" and r.get("sampler_steps")
               and r.get("auc_low_level") is not None]
    if quality:
        best = min(quality, key=lambda r: r["auc_low_level"])
        out[f"low-level AUC < {TARGET_AUC}"] = (f"{best['auc_low_level']:.3f} ({row_sampler(best).label}): "
                                                f"{'met' if best['auc_low_level'] < TARGET_AUC else 'not met'}")
        high = [r for r in quality if r.get("auc_high_level") is not None]
        if high:
            best = min(high, key=lambda r: r["auc_high_level"])
            met = best["auc_high_level"] < TARGET_HIGH_LEVEL_AUC
            out[f"high-level AUC < {TARGET_HIGH_LEVEL_AUC} (issue 12)"] = (
                f"{best['auc_high_level']:.3f} ({row_sampler(best).label}, {best['n_generated']} generated vs "
                f"{best['n_reference']} reference): {'met' if met else 'not met'}")
    batch100 = [r for r in rows if r.get("part") == "speed" and r.get("batch") == 100 and r.get("ms_per_shower")]
    for row in batch100:
        verdict = "met" if row["ms_per_shower"] <= TARGET_MS_PER_SHOWER else "not met"
        if row["device"] != "cuda":
            verdict += " (CPU; the target is for an H100)"
        sampler = row_sampler(row)
        out[f"<= {TARGET_MS_PER_SHOWER} ms/shower at batch 100, {row['device']} {row['precision']} "
            f"{sampler.label} ({row['network_calls']} network calls)"] = f"{row['ms_per_shower']:.3g} ms: {verdict}"
    floor = [r["fpd"] for r in rows if r.get("part") == "adaptation" and str(r.get("arm")).startswith("ideal")
             and r.get("fpd")]
    for row in rows:
        if row.get("part") == "adaptation" and row.get("fpd_ratio") is not None:
            verdict = f"{row['fpd_ratio']:.3f}: {'met' if row['meets_target'] else 'not met'}"
            # A ratio of two bad generators is no evidence of a good one: say how far the better is.
            if floor and row["fpd_pretrained_mean"] > UNUSABLE_FPD_FACTOR * floor[0]:
                verdict += (f"; but the pretrained arm's FPD is still {row['fpd_pretrained_mean'] / floor[0]:.0f}x "
                            f"the simulator-vs-simulator floor: the ratio measures the scratch arm's failure more "
                            f"than the adapted model's quality")
            out[f"FPD pretrained / scratch <= {TARGET_FPD_RATIO} at n = {row['n']}"] = verdict
    return out
