"""Label efficiency and transfer: pretrained backbones, the same backbone from scratch, and simple
references, on the same labels and the same test sets.

Tasks (``--tasks``):

* pid: electron / photon / pion on ``par04-scipb``, a geometry the backbone was not pretrained on;
  accuracy.
* gamma_pi0: Geant4 photons against pi0 (20-100 GeV, decaying 500 mm upstream) in the ds2 SiW
  calorimeter, the 1000 showers of ``shared/data/geant4``: five folds, each seed tests on its own
  200 showers, validates on 200 others and draws its labels from the remaining 600; accuracy.
* electron_energy: incident energy of electrons on ``par04-scipb``; relative resolution (lower is
  better). Every arm sits at the sampling floor: a sanity row, not a contest.
* pion_energy: the same for charged pions, where the shower's shape carries the correction for
  invisible energy: the regression with headroom for a network.
* segmentation: per-point LArTPC classes (``lartpc-768``); mean F1 over the classes.

Arms: ``scratch`` (random weights), ``pretrained`` (masked point modelling, :func:`pcfm.pretrain`
objective "mpm", on ds2 showers for the shower tasks and on LArTPC events for segmentation; every
weight fine-tuned), ``linear`` (the pretrained backbone frozen, a head trained: the linear probe),
and ``reference``: logistic regression and boosted trees on high-level shower features, linear
and boosted regression, per-point boosted trees on local features (``benchmarks/references.py``,
needs the ``bench`` extra). A reference's setting is chosen on the same validation set; its
"best" row is the one with the higher validation score.

Protocol. Each simulated task has a labelled pool, a validation set and a test set, simulated with
their own seeds (gamma_pi0: the folds above); the pool holds ``--pool-factor`` (2) times the
largest label count. A run with ``n`` labels and seed ``s`` trains on a
seeded subset of the pool (balanced over classes for classification); every arm and the
references see the same subset. The learning rate of each (task, arm) is chosen from
``--lr-grid`` on seed 0 with ``--select-labels`` labels, by the lowest validation loss; every
run keeps the weights of its lowest validation loss (checked every ``--val-every`` steps,
stopping after ``--patience`` checks without improvement); the test set is used once, at the
end. Means over seeds come with standard errors (std / sqrt(seeds)). A comparison "A >= B" is met
when mean(A) - mean(B) >= -(standard error of the difference).

    python benchmarks/transfer.py [--config cpu|micro] [--tasks T ...] [--seeds S ...]
        [--n-labels N ...] [--curve-labels N ...] [--workers W] [--workdir DIR] [--out FILE.json] ...

Output: JSON (``benchmarks/results/transfer.json`` for ``--config cpu``), with a ``summary`` row
per task (the means and standard errors of pretrained@100, scratch@100, scratch@1000,
reference@100, reference@1000, linear@100 and the checks of issue 12), the token coverage of the
backbone on both detector families, a markdown report (.md) and a plot (.png). Runs go to
``--workdir``: a rerun with the same settings reuses finished runs, so an interrupted benchmark
continues where it stopped. Runs go to ``--workers`` processes of ``--threads`` torch threads each.

This file holds the runs, the plan and the command line; the tasks and sizes are in
``transfer_config.py``, the events and splits in ``transfer_data.py``, the aggregation, the
target checks and the report in ``transfer_report.py``.

Why one module of this length: it is the orchestration only (pretraining, the run jobs and their
reuse, the learning-rate choice on validation, the worker pool, coverage, the command line);
configuration, data and report live in transfer_config.py, transfer_data.py and
transfer_report.py.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import references
from _common import (RESULTS_DIR, add_config_options, announce, apply_config_options, as_json, log,
                     parse_json_or_text, write_results)
from pcfm.io import atomic_path
from transfer_config import (ARMS, CONFIGS, Config, GAMMA_PI0_FOLDS, LARTPC_GEOMETRY, LEAK_THRESHOLD, PARTICLES,
                             RUN_RECORD, SEED_COVERAGE, SEED_LARTPC_PRETRAIN, SEED_SOURCE, SOURCE_GEOMETRY,
                             TARGET_GEOMETRY, TASKS, clock, label_counts, model_label, steps_for)
from transfer_data import class_labels, domain_settings, load_domain, prepare_domain, simulate, split_for
from transfer_report import aggregate, make_plot, report, summarise
# read as transfer.X by the tests and other scripts:
from transfer_config import gamma_pi0_pool_size  # noqa: F401
from transfer_data import gamma_pi0_fold  # noqa: F401
from transfer_report import SUMMARY_KEYS, compare  # noqa: F401

# ----------------------------------------------------------------------------- pretraining


def pretrain_settings(source: str, config: Config) -> dict:
    if source == "showers":
        return as_json({"source": source, "model": config.model, "geometry": SOURCE_GEOMETRY,
                        "particles": PARTICLES, "energy_range": config.energy_range, "n_events": config.n_source,
                        "steps": config.pretrain_steps, "batch_points": config.pretrain_batch_points,
                        "lr": config.pretrain_lr, "seed": SEED_SOURCE})
    return as_json({"source": source, "model": config.model, "geometry": LARTPC_GEOMETRY,
                    "lartpc_points": config.lartpc_points, "n_events": config.n_lartpc_pretrain,
                    "steps": config.pretrain_lartpc_steps, "batch_points": config.pretrain_batch_points,
                    "lr": config.pretrain_lr, "seed": SEED_LARTPC_PRETRAIN})


def pretrain_folder(source: str, config: Config, workdir: Path) -> Path:
    return workdir / "pretrain" / source / model_label(config.model)


def run_pretraining(source: str, config: Config, workdir: Path) -> dict:
    """MPM pretraining on ``source``; reused when finished with the same settings, resumed when
    interrupted, started afresh when the settings differ."""
    from pcfm.api import pretrain

    folder = pretrain_folder(source, config, workdir)
    settings = pretrain_settings(source, config)
    record_file = folder / "settings.json"
    stored = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if stored.get("settings") == settings and stored.get("done") and (folder / "checkpoints" / "last.ckpt").is_file():
        return {**stored["summary"], "reused": True}
    if stored.get("settings") != settings and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "done": False}))
    steps = settings["steps"]
    options = {"particles": PARTICLES, "energy_range": tuple(config.energy_range)} if source == "showers" else {
        "lartpc_points": tuple(config.lartpc_points) if config.lartpc_points else None}
    start = time.perf_counter()
    result = pretrain("mpm", geometry=settings["geometry"], model=config.model, max_steps=steps,
                      batch_points=settings["batch_points"], lr=settings["lr"], n_events=settings["n_events"],
                      val_fraction=0.05, workdir=folder, resume=True, accelerator="cpu", devices=1,
                      seed=settings["seed"], progress=False, log_every_n_steps=max(1, min(50, steps // 20)),
                      checkpoint_every_n_steps=max(1, min(250, steps // 4)), data_options=options)
    seconds = time.perf_counter() - start
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    summary = {"source": source, "model": model_label(config.model), "geometry": settings["geometry"],
               "steps": steps, "n_events": settings["n_events"], "seconds": round(seconds, 1),
               "seconds_per_step": round(seconds / max(1, steps), 4), "first_loss": losses[0] if losses else None,
               "final_loss": float(np.mean(losses[-3:])) if losses else None,
               "val_loss": result.metrics.get("val/loss"), "checkpoint": str(result.checkpoint_path)}
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "done": True, "summary": summary}))
    return {**summary, "reused": False}


# ----------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class Job:
    """One fine-tune (arm scratch / pretrained / linear) or one reference fit (arm reference)."""

    task: str
    arm: str
    n: int
    seed: int
    lr: Optional[float] = None

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f" lr={self.lr:g}"
        return f"{self.task} {self.arm} n={self.n} seed={self.seed}{lr}"

    def folder(self, config: Config, workdir: Path) -> Path:
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return workdir / "runs" / self.task / model_label(config.model) / self.arm / f"n{self.n}_seed{self.seed}{lr}"


#: The event-level heads' first layer in every network run (pcfm.finetune's head_norm).
HEAD_NORM = "batch"


def job_settings(job: Job, config: Config) -> dict:
    spec = TASKS[job.task]
    common = {"job": dataclasses.asdict(job), "data": domain_settings(spec.domain, config)}
    if job.arm == "reference":
        return as_json({**common, "max_points": config.max_reference_points})
    lartpc = spec.domain == "lartpc"
    return as_json({
        **common, "model": config.model, "task": spec.finetune_task,
        "pretraining": None if job.arm == "scratch" else pretrain_settings(spec.pretrained_from, config),
        "mode": "linear" if job.arm == "linear" else "full", "max_steps": steps_for(job.n, config, job.task),
        "batch_points": config.lartpc_batch_points if lartpc else config.batch_points,
        "val_every": config.val_every, "patience": config.patience, "augment": config.augment,
        "min_steps": min_steps_for(job, config),
        # event-level heads standardise over the batch (pcfm.finetune's default); runs stored
        # before that had the LayerNorm head and are not reused. Segmentation's head has neither.
        **({} if spec.finetune_task == "segmentation" else {"head_norm": HEAD_NORM})})


def min_steps_for(job: Job, config: Config) -> int:
    """The step before which early stopping cannot end a network run."""
    return int(config.min_steps_fraction * steps_for(job.n, config, job.task))


def same_run(stored: dict, settings: dict) -> bool:
    """Whether a stored run answers ``settings``. A run recorded before ``min_steps`` existed
    (no stop before it) counts when it was not stopped early: a later earliest stop changes
    nothing for a run that trained all its steps."""
    if stored.get("settings") == settings:
        return True
    old = dict(stored.get("settings") or {})
    return ("min_steps" not in old and {**old, "min_steps": settings.get("min_steps")} == settings
            and stored.get("result", {}).get("stopped_early") is False)


def target_leak(module, events: list, targets: tuple = ("incident_energy",), n_events: int = 32) -> dict:
    """Regression: the largest change of the (standardised) outputs of ``n_events`` test events when
    only their true incident energy changes (x2): above :data:`LEAK_THRESHOLD` (and the run-to-run
    noise), the model reads its label."""
    from torch_geometric.data import Batch

    from pcfm.api import LabelledView

    view = LabelledView(events, np.arange(min(n_events, len(events))), None)
    batch = Batch.from_data_list([view[i] for i in range(len(view))])
    changed = batch.clone()
    changed.incident_energy = batch.incident_energy * 2.0
    module = module.cpu().eval()
    with torch.no_grad():
        reference = module(batch).float()
        noise = float((module(batch).float() - reference).abs().max())
        change = float((module(changed).float() - reference).abs().max())
    return {"change": change, "detected": change > max(LEAK_THRESHOLD, 10 * noise)}


def run_network(job: Job, config: Config, workdir: Path, settings: dict) -> dict:
    """One fine-tune through :func:`pcfm.finetune` on the run's exact train / validation / test events."""
    from pcfm.api import finetune

    spec = TASKS[job.task]
    train, val, test, train_index = split_for(job.task, job.n, job.seed, workdir)
    checkpoint = None
    if job.arm != "scratch":
        checkpoint = str(pretrain_folder(spec.pretrained_from, config, workdir) / "checkpoints" / "last.ckpt")
    folder = job.folder(config, workdir)
    start = time.perf_counter()
    result = finetune(spec.finetune_task, data=train, checkpoint=checkpoint, model=config.model,
                      mode=settings["mode"], n_labels=None, val_data=val, test_data=test,
                      **({"head_norm": settings["head_norm"]} if "head_norm" in settings else {}),
                      class_names=spec.class_names, targets=("incident_energy",), max_steps=settings["max_steps"],
                      batch_points=settings["batch_points"], lr=job.lr, augment=config.augment, workdir=folder,
                      resume=False, patience=config.patience, min_steps=settings["min_steps"],
                      val_every_n_steps=config.val_every,
                      checkpoint_every_n_steps=config.val_every, seed=job.seed, accelerator="cpu", devices=1,
                      progress=False, log_every_n_steps=max(1, min(25, config.val_every)))
    seconds = time.perf_counter() - start
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    record = {"metrics": metrics, "n_train": len(train), "train_index_digest": digest(train_index),
              "seconds": round(seconds, 1), "steps": result.training.get("steps"),
              "tested_step": result.training.get("tested_step"), "stopped_early": result.training.get("stopped_early"),
              "val_loss": result.training.get("best_val_loss"),
              "final_train_loss": float(np.mean(losses[-3:])) if losses else None,
              "label_leak": target_leak(result.module, test) if spec.finetune_task == "regression" else None}
    for path in (folder / "checkpoints").glob("*.ckpt"):  # keep the record and metrics, not 1000 checkpoints
        if path.name != "best.ckpt":
            path.unlink()
    return record


def digest(indices: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]


_FEATURE_CACHE: dict = {}


def shared_features(events: list, key: tuple, geometry: str) -> np.ndarray:
    """High-level features of a validation or test set, computed once per process: every reference
    run of a task scores the same sets."""
    if key not in _FEATURE_CACHE:
        _FEATURE_CACHE[key] = references.shower_features(events, geometry, use_incident_energy=key[-1])
    return _FEATURE_CACHE[key]


def run_reference(job: Job, config: Config, workdir: Path) -> dict:
    """The simple references on the run's exact train / validation / test events."""
    spec = TASKS[job.task]
    train, val, test, train_index = split_for(job.task, job.n, job.seed, workdir)
    start = time.perf_counter()
    if spec.finetune_task == "segmentation":
        result = references.segment(train, val, test, job.seed, max_train_points=config.max_reference_points,
                                    threads=1)
    else:
        geometry = SOURCE_GEOMETRY if spec.domain == "gamma_pi0" else TARGET_GEOMETRY
        classification = spec.finetune_task == "classification"
        fold = job.seed % GAMMA_PI0_FOLDS if spec.domain == "gamma_pi0" else None
        features = [references.shower_features(train, geometry, use_incident_energy=classification)]
        features += [shared_features(part, (workdir, spec.domain, name, fold, classification), geometry)
                     for name, part in (("val", val), ("test", test))]
        if classification:
            labels = [class_labels(part) for part in (train, val, test)]
            result = references.classify(features[0], labels[0], features[1], labels[1], features[2], labels[2],
                                         job.seed, threads=1)
        else:
            labels = [np.log(np.array([float(e.incident_energy) for e in part])) for part in (train, val, test)]
            result = references.regress_energy(features[0], labels[0], features[1], labels[1], features[2],
                                               labels[2], job.seed, threads=1)
    models = {}
    for name, entry in result.items():
        models[name] = {"chosen": entry.get("model", name), "params": entry.get("params"),
                        "val_score": entry.get("val_accuracy", entry.get("val_resolution", entry.get("val_mean_f1"))),
                        "metrics": {k: float(v) for k, v in entry["test"].items() if isinstance(v, (int, float))}}
    return {"metrics": models["best"]["metrics"], "models": models, "n_train": len(train),
            "train_index_digest": digest(train_index), "seconds": round(time.perf_counter() - start, 1)}


def execute(job: Job, config: Config, workdir: Path) -> dict:
    """Run a job, or return its record when it finished before with the same settings."""
    folder = job.folder(config, workdir)
    settings = job_settings(job, config)
    record_file = folder / RUN_RECORD
    if record_file.is_file():
        stored = json.loads(record_file.read_text())
        if same_run(stored, settings):
            return {**stored["result"], "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    record = run_reference(job, config, workdir) if job.arm == "reference" else run_network(job, config, workdir,
                                                                                            settings)
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "result": record}, allow_nan=True))
    return {**record, "reused": False}


def _worker_setup(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:
        sys.path.insert(0, bench)
    quiet_lightning()


def _execute_task(args) -> tuple:
    kind, payload, config, workdir = args
    try:
        if kind == "pretrain":
            return kind, payload, run_pretraining(payload, config, workdir), None
        return kind, payload, execute(payload, config, workdir), None
    except Exception as error:  # reported by the parent with the job's name
        import traceback
        return kind, payload, None, f"{error!r}\n{traceback.format_exc()}"


class Runner:
    """Runs jobs in ``workers`` processes (in this process with one worker), logging each as it ends."""

    def __init__(self, config: Config, workdir: Path):
        self.config, self.workdir, self.start = config, workdir, time.perf_counter()
        self.pool = None
        if config.workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = futures.ProcessPoolExecutor(config.workers, mp_context=context, initializer=_worker_setup,
                                                    initargs=(config.threads,))

    def run(self, items: list) -> dict:
        """``{item: record}`` of ``items``: ``("pretrain", source)`` or ``("job", Job)`` pairs, run in
        any order (none may need another's result)."""
        out, args = {}, [(kind, item, self.config, self.workdir) for kind, item in items]
        if self.pool:
            results = (future.result() for future in futures.as_completed(
                [self.pool.submit(_execute_task, arg) for arg in args]))
        else:
            results = map(_execute_task, args)
        for done, (kind, item, record, error) in enumerate(results, 1):
            name = f"pretrain {item}" if kind == "pretrain" else item.name
            if error:
                raise RuntimeError(f"{name} failed: {error}")
            out[(kind, item)] = record
            detail = "reused" if record.get("reused") else f"{record['seconds']:.0f} s"
            shown = "" if kind == "pretrain" else \
                f": {TASKS[item.task].metric} {record['metrics'].get(TASKS[item.task].metric, math.nan):.4f}"
            log(f"[{done}/{len(items)}] {name}{shown} ({detail}; elapsed {clock(time.perf_counter() - self.start)})")
        return out

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


# ----------------------------------------------------------------------------- plan


def lr_grid(arm: str, config: Config) -> list:
    return list(config.linear_lr_grid if arm == "linear" else config.lr_grid)


def selection_jobs(config: Config) -> list[Job]:
    """The learning-rate choice: seed 0 with ``select_labels`` labels, each lr of the arm's grid."""
    return [Job(task, arm, config.select_labels, config.seeds[0], lr) for task in config.tasks for arm in config.arms
            if len(lr_grid(arm, config)) > 1 for lr in lr_grid(arm, config)]


def chosen_lr(task: str, arm: str, records: dict, config: Config) -> float:
    grid = lr_grid(arm, config)
    if len(grid) == 1:
        return grid[0]
    scores = [(records[Job(task, arm, config.select_labels, config.seeds[0], lr)]["val_loss"], lr) for lr in grid]
    return min(scores, key=lambda item: (math.inf if item[0] is None or not math.isfinite(item[0]) else item[0]))[1]


def arm_runs_at(task: str, arm: str, n: int, config: Config) -> bool:
    """Whether ``arm`` runs with ``n`` labels (``arm_labels``; an arm not named there runs at every
    count; gamma_pi0's largest count stands for the largest asked)."""
    asked = config.arm_labels.get(arm)
    if asked is None:
        return True
    counts = label_counts(task, config)
    return n in asked or (n == max(counts) and max(asked) >= n and TASKS[task].domain == "gamma_pi0")


def main_jobs(config: Config, lrs: dict) -> list[Job]:
    """Every fine-tune and reference of the benchmark, with the chosen learning rates."""
    jobs = []
    for task in config.tasks:
        for n in label_counts(task, config):
            curve_only = n not in config.n_labels and not (TASKS[task].domain == "gamma_pi0"
                                                           and n == max(label_counts(task, config)))
            seeds = config.curve_seeds if curve_only else config.seeds
            for seed in seeds:
                if config.references:
                    jobs.append(Job(task, "reference", n, seed))
                for arm in config.arms:
                    if not arm_runs_at(task, arm, n, config):
                        continue
                    jobs.append(Job(task, arm, n, seed, lrs.get((task, arm))))
    return jobs


# ----------------------------------------------------------------------------- coverage


def coverage_rows(config: Config, workdir: Path) -> list[dict]:
    """Token coverage of the backbone (:func:`pcfm.nn.token_coverage`) on events of both detector
    families, whatever the tasks: simulated ds2 and par04 showers (e / gamma / pi over the
    configured energies), default LArTPC events, and the Geant4 showers when gamma_pi0 runs;
    mean and minimum over events."""
    from torch_geometric.data import Batch

    from pcfm.api import pretrained_backbone
    from pcfm.engine.data import simulate_pretraining_events
    from pcfm.nn import Backbone, token_coverage

    backbone_config, _ = pretrained_backbone(None, config.model)
    backbone = Backbone(backbone_config).eval()
    n = config.n_coverage
    energies = f"{config.energy_range[0] / 1e3:g}-{config.energy_range[1] / 1e3:g} GeV"
    samples = {}
    for geometry in (SOURCE_GEOMETRY, TARGET_GEOMETRY):
        events = simulate_pretraining_events(geometry, n, particles=PARTICLES, energy_range=tuple(config.energy_range),
                                             seed=SEED_COVERAGE)
        samples[f"{geometry}: simulated e / gamma / pi, {energies}"] = [events[i] for i in range(len(events))]
    samples[f"{LARTPC_GEOMETRY}: simulated events"] = simulate("lartpc", n, SEED_COVERAGE, config)
    if any(TASKS[t].domain == "gamma_pi0" for t in config.tasks):
        samples[f"{SOURCE_GEOMETRY}: Geant4 gamma / pi0 (gamma_pi0 task)"] = load_domain("gamma_pi0", workdir)["all"]
    rows = []
    for name, events in samples.items():
        with torch.no_grad():
            values = [token_coverage(backbone, Batch.from_data_list([event])) for event in events]
        rows.append({"part": "coverage", "events": name, "n_events": len(values), "mean": float(np.mean(values)),
                     "min": float(np.min(values))})
        log(f"[coverage] {name}: mean {np.mean(values):.4f}, min {np.min(values):.4f} over {len(values)} events")
    return rows


# ----------------------------------------------------------------------------- command line


OPTION_HELP = {
    "model": "backbone preset (or a JSON dict of pcfm.pretrain's model argument)",
    "tasks": f"tasks among {list(TASKS)}", "seeds": "seeds of the main label counts (labels and initialisation)",
    "n_labels": "main label counts (the first and last are the summary's 100 and 1000)",
    "curve_labels": "more label counts of the learning curve", "curve_seeds": "seeds at the curve's label counts",
    "arms": f"network arms among {list(ARMS)}",
    "arm_labels": "JSON {arm: [label counts]}: where an arm runs (default: the probe at 100 and 1000, others everywhere)",
    "references": "fit the simple references (needs the bench extra)",
    "energy_range": "incident energies of simulated showers, MeV, LO HI",
    "lartpc_points": "grow / cut simulated LArTPC events to LO HI points (default: as simulated)",
    "pool_factor": "labelled pool = this x the largest label count (seeds draw different labels)",
    "n_val": "validation showers", "n_lartpc_val": "validation LArTPC events", "n_test": "test showers",
    "n_lartpc_test": "test LArTPC events",
    "gamma_pi0_per_class": "Geant4 showers read per class (default: all 500)", "pretrain_steps": "MPM steps on ds2 showers",
    "pretrain_lartpc_steps": "MPM steps on LArTPC events", "pretrain_batch_points": "points per pretraining batch",
    "pretrain_lr": "pretraining peak lr", "n_source": "simulated ds2 pretraining showers",
    "n_lartpc_pretrain": "simulated LArTPC pretraining events",
    "steps_at": "JSON {labels: max steps}: the fine-tune step budget by label count",
    "task_steps_at": "JSON {task: {labels: max steps}}: tables that replace steps_at for those tasks",
    "min_steps_fraction": "early stopping cannot end a run before this fraction of its step budget",
    "batch_points": "points per fine-tune batch (showers)", "lartpc_batch_points": "points per batch (LArTPC)",
    "lr_grid": "learning rates tried for scratch and pretrained", "linear_lr_grid": "learning rates of the probe",
    "select_labels": "label count at which the learning rate is chosen (seed 0)",
    "val_every": "steps between validations", "patience": "validations without improvement before stopping",
    "augment": "train on random detector symmetries of each event",
    "max_reference_points": "training points of the per-point reference (segmentation)",
    "n_coverage": "simulated events per detector on which the token coverage is measured",
    "workers": "processes running fine-tunes side by side", "threads": "torch threads per process",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="size preset (default cpu)")
    parser.add_argument("--workdir", type=Path, default=None, help="runs and data (default pcfm_runs/transfer_CONFIG)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (.md and .png go beside it)")
    add_config_options(parser, Config, OPTION_HELP, special={
        "model": {"type": parse_json_or_text}, "tasks": {"choices": list(TASKS), "nargs": "+"},
        "arms": {"choices": list(ARMS), "nargs": "+"}, "lartpc_points": {"type": int, "nargs": 2},
        "gamma_pi0_per_class": {"type": int}, "curve_labels": {"type": int, "nargs": "*"},
        "steps_at": {"type": json.loads}, "task_steps_at": {"type": json.loads}, "arm_labels": {"type": json.loads}})
    return parser


def quiet_lightning() -> None:
    """Keep the per-run progress readable: Lightning's banners and known-harmless warnings off."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*Total length of .* across ranks is zero.*",
                    ".*custom batch sampler.*", ".*`max_epochs` was not set.*", ".*LeafSpec.*",
                    ".*smaller than the logging interval.*", ".*more than max_points.*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    config = apply_config_options(Config(**CONFIGS[args.config]), args, tuple_fields=("lartpc_points",))
    config.threads = config.threads or 1
    _worker_setup(config.threads)
    start = time.perf_counter()
    command, machine = announce()
    name = "transfer" if args.config == "cpu" else f"transfer_{args.config}"
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    workdir = Path(args.workdir or f"pcfm_runs/transfer_{args.config}")
    settings = as_json(dataclasses.asdict(config))
    log(f"config {args.config}: {json.dumps(settings)}")

    for domain in sorted({TASKS[t].domain for t in config.tasks}):
        prepare_domain(domain, config, workdir)
    coverage = coverage_rows(config, workdir)
    runner = Runner(config, workdir)
    try:
        sources = sorted({TASKS[t].pretrained_from for t in config.tasks}) if set(config.arms) - {"scratch"} else []
        selection_plan = selection_jobs(config)
        references = [job for job in main_jobs(config, {}) if job.arm == "reference"]
        # what needs no pretraining and no learning-rate choice runs beside the pretraining
        done = runner.run([("pretrain", source) for source in sources]
                           + [("job", job) for job in selection_plan if job.arm == "scratch"]
                           + [("job", job) for job in references])
        pretrainings = [done[("pretrain", source)] for source in sources]
        done.update(runner.run([("job", job) for job in selection_plan if job.arm != "scratch"]))
        selection = {job: done[("job", job)] for job in selection_plan}
        lrs = {(task, arm): chosen_lr(task, arm, selection, config) for task in config.tasks for arm in config.arms}
        log("[lr] chosen on validation: " + ", ".join(f"{t} {a} {lr:g}" for (t, a), lr in lrs.items()))
        jobs = main_jobs(config, lrs)
        rest = [("job", job) for job in jobs if ("job", job) not in done]
        done.update(runner.run(rest))
        records = {job: done[("job", job)] for job in jobs}
    finally:
        runner.close()
    rows = [{"part": "run", "task": job.task, "arm": job.arm, "n_labels": job.n, "seed": job.seed, "lr": job.lr,
             **records[job]} for job in jobs]
    selection_rows = [{"part": "lr_selection", "task": job.task, "arm": job.arm, "lr": job.lr,
                       "val_loss": record["val_loss"], "chosen": lrs[(job.task, job.arm)] == job.lr}
                      for job, record in selection.items()]
    aggregates = aggregate(rows)
    plot_path = out.with_suffix(".png")
    skipped = make_plot(aggregates, config, plot_path)
    summary = {"part": "summary", "config": args.config, "settings": settings, "workdir": str(workdir),
               "summary": summarise(aggregates, config), "pretraining": pretrainings,
               "total_wall_s": round(time.perf_counter() - start, 1),
               "runs_fresh": sum(not r.get("reused") for r in done.values()),
               "runs_reused": sum(bool(r.get("reused")) for r in done.values()),
               "plot": None if skipped else str(plot_path), "plot_skipped": skipped}
    rows = rows + selection_rows + aggregates + coverage + [summary]
    write_results(name, command, machine, rows, out)
    text = report(rows, args.config, config, command, machine)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    log("")
    log(text)
    return rows


if __name__ == "__main__":
    main()
