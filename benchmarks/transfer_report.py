"""The transfer benchmark's aggregation over seeds, its checks of the issue-12 targets, the
plot and the markdown report (:mod:`transfer`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from _common import markdown_table, save_png

from transfer_config import Config, GAMMA_PI0_FOLDS, TARGET_GEOMETRY, TASKS, label_counts, model_label

# ----------------------------------------------------------------------------- aggregation and checks


def mean_and_error(values: list[float]) -> dict:
    values = np.asarray(values, dtype=float)
    error = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "standard_error": error, "n_seeds": int(len(values)),
            "values": values.tolist()}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard error over seeds per (task, arm, n)."""
    out = []
    for key in sorted({(r["task"], r["arm"], r["n_labels"]) for r in rows if r["part"] == "run"}):
        task, arm, n = key
        spec = TASKS[task]
        runs = [r for r in rows if r["part"] == "run" and (r["task"], r["arm"], r["n_labels"]) == key]
        row = {"part": "aggregate", "task": task, "arm": arm, "n_labels": n, "metric": spec.metric,
               "higher_is_better": spec.higher_is_better,
               **mean_and_error([r["metrics"][spec.metric] for r in runs]),
               "lr": runs[0].get("lr"), "label_leak": any((r.get("label_leak") or {}).get("detected") for r in runs)}
        for name in spec.secondary:
            row[name + "_mean"] = float(np.mean([r["metrics"].get(name, math.nan) for r in runs]))
        if arm == "reference":
            chosen = [r["models"]["best"]["chosen"] for r in runs]
            row["chosen"] = {name: chosen.count(name) for name in sorted(set(chosen))}
        out.append(row)
    return out


def compare(a: Optional[dict], b: Optional[dict], higher_is_better: bool) -> dict:
    """``a >= b`` (better or equal in the task's sense) within one standard error of the difference."""
    if a is None or b is None:
        return {"met": None, "note": "not measured"}
    sign = 1.0 if higher_is_better else -1.0
    advantage = sign * (a["mean"] - b["mean"])
    error = math.sqrt(sum((x["standard_error"] or 0.0) ** 2 for x in (a, b)))
    return {"met": bool(advantage >= -error), "advantage": advantage, "standard_error": error}


SUMMARY_KEYS = (("pretrained@100", "pretrained", "low"), ("scratch@100", "scratch", "low"),
                ("scratch@1000", "scratch", "high"), ("reference@100", "reference", "low"),
                ("reference@1000", "reference", "high"), ("linear@100", "linear", "low"))


def summarise(aggregates: list[dict], config: Config) -> dict:
    """The issue-12 summary: per task the means and standard errors at 100 and 1000 labels (the
    task's largest label count when its pool holds fewer), and the checks."""
    low, high = min(config.n_labels), max(config.n_labels)
    tasks = {}
    for task in config.tasks:
        spec = TASKS[task]
        counts = label_counts(task, config)
        n_of = {"low": min(low, max(counts)), "high": min(high, max(counts))}
        record = {"metric": spec.metric, "higher_is_better": spec.higher_is_better, "labels": n_of}
        for key, arm, which in SUMMARY_KEYS:
            found = next((a for a in aggregates if (a["task"], a["arm"], a["n_labels"]) == (task, arm, n_of[which])),
                         None)
            record[key] = None if found is None else {k: found[k] for k in ("mean", "standard_error", "n_seeds")}
        record["checks"] = {
            "scratch@1000 >= reference@1000": compare(record["scratch@1000"], record["reference@1000"],
                                                      spec.higher_is_better),
            "pretrained@100 >= reference@100": compare(record["pretrained@100"], record["reference@100"],
                                                       spec.higher_is_better),
            "pretrained@100 >= scratch@1000": compare(record["pretrained@100"], record["scratch@1000"],
                                                      spec.higher_is_better),
            "pretrained@100 >= scratch@100": compare(record["pretrained@100"], record["scratch@100"],
                                                     spec.higher_is_better)}
        tasks[task] = record
    targets = []
    for task in ("pid", "segmentation"):
        if task in tasks:
            for check in ("scratch@1000 >= reference@1000", "pretrained@100 >= reference@100"):
                targets.append({"target": f"{task}: {check}", "met": tasks[task]["checks"][check]["met"]})
    if "gamma_pi0" in tasks:
        scratch = tasks["gamma_pi0"]["scratch@1000"]
        targets.append({"target": f"gamma_pi0: scratch with {tasks['gamma_pi0']['labels']['high']} labels "
                                  f"reaches accuracy 0.95", "met": None if scratch is None else scratch["mean"] >= 0.95})
    transfer = [task for task, record in tasks.items() if record["checks"]["pretrained@100 >= scratch@1000"]["met"]]
    targets.append({"target": "pretrained@100 >= scratch@1000 on at least two tasks", "met": len(transfer) >= 2,
                    "tasks": transfer})
    return {"tasks": tasks, "targets": targets,
            "rule": "A >= B is met when mean(A) - mean(B) >= -(standard error of the difference), in the "
                    "task's direction (lower is better for resolutions)"}


# ----------------------------------------------------------------------------- plot and report


def make_plot(aggregates: list[dict], config: Config, path: Path) -> Optional[str]:
    """Metric against labels per task (log x), one line per arm, error bars = standard errors.
    Returns why it was skipped, or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed"
    tasks = [t for t in config.tasks if any(a["task"] == t for a in aggregates)]
    if not tasks:
        return "no results"
    columns = min(3, len(tasks))
    rows = int(math.ceil(len(tasks) / columns))
    fig = Figure(figsize=(4.6 * columns, 3.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, task in zip(axes, tasks):
        spec = TASKS[task]
        for arm, style in (("pretrained", "o-C0"), ("scratch", "s-C1"), ("linear", "^--C2"), ("reference", "D:C7")):
            points = sorted((a["n_labels"], a["mean"], a["standard_error"] or 0.0) for a in aggregates
                            if a["task"] == task and a["arm"] == arm)
            if points:
                n, mean, error = zip(*points)
                ax.errorbar(n, mean, yerr=error, fmt=style[:-2], color=style[-2:], capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training events")
        ax.set_ylabel(spec.metric + ("" if spec.higher_is_better else " (lower is better)"))
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    save_png(fig, path)
    return None


AGGREGATE_COLUMNS = [("task", "task", ""), ("arm", "arm", ""), ("labels", "n_labels", "d"), ("metric", "metric", ""),
                     ("mean", "mean", ".4f"), ("s.e.", "standard_error", ".4f"), ("seeds", "n_seeds", "d"),
                     ("lr", "lr", "g"), ("macro F1", "mean_f1_mean", ".4f"), ("E bias", "incident_energy/bias_mean", ".4f")]
COVERAGE_COLUMNS = [("events", "events", ""), ("n", "n_events", "d"), ("mean coverage", "mean", ".4f"),
                    ("lowest", "min", ".4f")]
PRETRAIN_COLUMNS = [("source", "source", ""), ("geometry", "geometry", ""), ("events", "n_events", "d"),
                    ("steps", "steps", "d"), ("s", "seconds", ".0f"), ("first loss", "first_loss", ".3f"),
                    ("final loss", "final_loss", ".3f"), ("val. loss", "val_loss", ".3f")]


def cell(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    error = entry["standard_error"]
    return f"{entry['mean']:.4f}" + ("" if error is None else f" ± {error:.4f}") + f" ({entry['n_seeds']})"


def report(rows: list[dict], config_name: str, config: Config, command: str, machine: dict) -> str:
    summary = next(r for r in rows if r["part"] == "summary")
    aggregates = [r for r in rows if r["part"] == "aggregate"]
    lines = ["## Label efficiency and transfer (`benchmarks/transfer.py`)", "",
             f"`{command}` — {machine.get('gpu', machine.get('cpu'))}, {config.workers} worker(s) x "
             f"{config.threads} thread(s), torch {machine.get('torch')}; config `{config_name}`; "
             f"{summary['total_wall_s']:.0f} s in all ({summary['runs_fresh']} runs now, "
             f"{summary['runs_reused']} reused).", "",
             f"Backbone {model_label(config.model)}; learning rates chosen on validation from {config.lr_grid} "
             f"(linear probe {config.linear_lr_grid}); at most {config.steps_at} steps of {config.batch_points} points "
             f"({config.task_steps_at} for those tasks), the lowest validation loss kept (every {config.val_every} "
             f"steps, patience {config.patience}, no stop before {config.min_steps_fraction:g} of the budget); "
             f"symmetry augmentation {'on' if config.augment else 'off'}. Test sets: {config.n_test} "
             f"{TARGET_GEOMETRY} showers, {config.n_lartpc_test} LArTPC events, "
             f"{2 * (config.gamma_pi0_per_class or 500) // GAMMA_PI0_FOLDS} Geant4 showers per gamma_pi0 fold "
             f"(seed = fold).",
             "", "### Summary (mean ± standard error (seeds))", ""]
    header = "| task | metric | " + " | ".join(key for key, _, _ in SUMMARY_KEYS) + " |"
    lines += [header, "|" + "---|" * (2 + len(SUMMARY_KEYS))]
    for task, record in summary["summary"]["tasks"].items():
        metric = record["metric"] + ("" if record["higher_is_better"] else " (lower better)")
        lines.append(f"| {task} | {metric} | " + " | ".join(cell(record[key]) for key, _, _ in SUMMARY_KEYS) + " |")
    lines += ["", "### Targets (issue 12)", ""]
    for target in summary["summary"]["targets"]:
        state = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"- {target['target']}: **{state}**")
    lines += ["", f"Rule: {summary['summary']['rule']}.", "", "### Token coverage", "",
              markdown_table([r for r in rows if r["part"] == "coverage"], COVERAGE_COLUMNS), "",
              "### Pretraining", "", markdown_table(summary["pretraining"], PRETRAIN_COLUMNS), "",
              "### Every arm and label count", "", markdown_table(aggregates, AGGREGATE_COLUMNS), ""]
    leaks = sorted({(r["task"], r["arm"]) for r in rows if r["part"] == "run" and (r.get("label_leak") or {}).get("detected")})
    if leaks:
        lines += [f"**Label leak** in {leaks}: those regression rows measure nothing.", ""]
    plot = summary.get("plot")
    lines.append(f"![transfer]({Path(plot).name})" if plot else f"Plot skipped: {summary.get('plot_skipped')}.")
    return "\n".join(lines) + "\n"
