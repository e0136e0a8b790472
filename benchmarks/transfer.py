"""Transfer across detector geometries: a pretrained backbone against the same model from scratch.

Masked point modelling (:func:`pcfm.pretrain`, objective "mpm") on the source geometries
(``--source-geometries``, default ``calochallenge-ds2``; electrons, photons and charged pions)
and on LArTPC events (``lartpc-768``); then :func:`pcfm.finetune` with ``n`` labels
(``--n-labels``) and several seeds (``--seeds``), each pretrained arm against the same backbone
from random weights, with the same labels, steps, learning rate and schedule. With
``--label-step-exponent p`` a fine-tune with ``n`` labels runs ``(n / smallest n) ** p`` times
the steps (default 0: equal steps; 0.5 checks that a baseline with more labels is not simply
under-trained):

* pid: particle identification (electron / photon / pion) on the unseen ``--target-geometry``
  (default ``par04-scipb``), backbone pretrained on the source showers; accuracy (and macro F1);
* regression: incident energy of electrons and photons (``--regression-particles``) on the
  target geometry, the same backbone; relative resolution std((E_pred - E) / E) (lower is
  better) and bias. Pions are left out by default: their visible energy in the simulator
  fluctuates so much (response about 0.38 +- 57% on par04-scipb) that they would dominate the
  spread whatever the model;
* segmentation: per-point LArTPC classes, backbone pretrained on LArTPC events; mean F1;
* segmentation_cross: the same, backbone pretrained on the source showers only (cross-domain).
  Its scratch arm is the segmentation scratch arm (the same runs).

Each task's events are simulated once: a labelled pool (fine-tunes draw their ``n`` labels
from it, balanced over classes for pid, with the run's seed) and an independent test set (its
own simulation seed) on which every fine-tune of the task is scored, so runs differ only by
their labels and initialisation. (``pcfm.finetune`` also holds out a small part of the pool
for its own ``metrics.json``; the benchmark does not use those numbers.) Regression runs are
checked for a label leak: a model whose predictions move when the event's true target field
changes can read the answer, and its rows are flagged and left out of the verdict.

Target (issue 5): on the unseen geometry, the pretrained backbone with ``--target-labels``
(100, 1000) -> pretrained at 100 labels matches or beats scratch at 1000 labels on at least two
of pid, regression and segmentation. "Matches" means: the pretrained mean is not worse than the
scratch mean by more than one standard error of the difference of the means (over seeds).

    python benchmarks/transfer.py [--config cpu|gpu|micro] [--models M ...] [--seeds S ...]
        [--n-labels N ...] [--tasks T ...] [--finetune-steps K] [--pretrain-steps K]
        [--target-geometry G] [--threads T] [--workdir DIR] [--out FILE.json] ...

Output: JSON (default benchmarks/results/transfer.json for ``--config cpu``,
transfer_<config>.json otherwise), a markdown summary beside it (.md) and a plot (.png:
metric against labels, pretrained vs scratch, one panel per task; needs matplotlib).
Checkpoints and runs go to ``--workdir`` (default ``pcfm_runs/transfer_<config>``); a rerun with
the same settings reuses finished pretrainings (and resumes interrupted ones) and finished
fine-tunes, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from _common import (RESULTS_DIR, add_config_options, announce, apply_config_options, as_json, device_for, fmt,
                     log, markdown_table, parse_json_or_text, save_png, write_results)
from pcfm.api import pretrain
from pcfm.api_finetune import LabelledView, finetune
from pcfm.data import PointBudgetBatchSampler
from pcfm.data.atomic import atomic_path
from pcfm.engine.data import EventList, event_sizes, simulate_pretraining_events
from pcfm.tasks.finetune import FinetuneModule, task_metrics

LARTPC_GEOMETRY = "lartpc-768"
PARTICLES = ("electron", "photon", "pion")


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: what is fine-tuned, on which events, from which pretraining."""

    finetune_task: str  # pcfm.finetune's task
    domain: str  # the events: "pid", "regression" (target-geometry showers) or "lartpc"
    pretrained_from: str  # "showers" (source geometries) or "lartpc": the pretraining
    metric: str  # primary metric (a task_metrics key)
    higher_is_better: bool
    secondary: tuple = ()
    label: str = ""


TASKS = {
    "pid": TaskSpec("classification", "pid", "showers", "accuracy", True, ("mean_f1",),
                    "particle identification (e / gamma / pi)"),
    "regression": TaskSpec("regression", "regression", "showers", "incident_energy/resolution", False,
                           ("incident_energy/bias",), "incident-energy regression"),
    "segmentation": TaskSpec("segmentation", "lartpc", "lartpc", "mean_f1", True, ("accuracy",),
                             "LArTPC semantic segmentation"),
    "segmentation_cross": TaskSpec("segmentation", "lartpc", "showers", "mean_f1", True, ("accuracy",),
                                   "LArTPC segmentation, backbone pretrained on showers only"),
}
#: The three tasks of the target; segmentation_cross is reported beside them.
VERDICT_TASKS = ("pid", "regression", "segmentation")
#: pcfm.finetune always keeps a seeded part of the pool for its own metrics.json: keep it small.
INTERNAL_TEST_FRACTION = 0.02
#: Simulation seeds: pretraining data, labelled pools and test sets never share one.
SEED_SOURCE, SEED_LARTPC_PRETRAIN = 0, 1
SEED_POOL = {"pid": 201, "regression": 211, "lartpc": 301}
SEED_TEST = {"pid": 202, "regression": 212, "lartpc": 302}
#: Output change (standardised units) above which a regression model is taken to read its target.
LEAK_THRESHOLD = 1e-4
#: Fine-tune record written in each run folder; a rerun with the same settings reuses it.
RUN_RECORD = "transfer_run.json"


@dataclass
class Config:
    """Every size of a run; ``--config`` picks a preset, options override single fields."""

    models: list = field(default_factory=lambda: ["tiny"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    n_labels: list = field(default_factory=lambda: [100, 1000])
    target_labels: tuple = (100, 1000)
    tasks: list = field(default_factory=lambda: list(TASKS))
    source_geometries: list = field(default_factory=lambda: ["calochallenge-ds2"])
    target_geometry: str = "par04-scipb"
    energy_range: tuple = (1e3, 1e5)
    regression_particles: list = field(default_factory=lambda: ["electron", "photon"])
    lartpc_points: Optional[tuple] = None
    # pretraining
    pretrain_steps: int = 400
    pretrain_lartpc_steps: int = 400
    pretrain_batch_points: int = 20_000
    pretrain_lr: float = 1e-3
    n_source: int = 3000
    n_lartpc_pretrain: int = 800
    # fine-tuning
    finetune_steps: int = 100
    finetune_lartpc_steps: int = 100
    label_step_exponent: float = 0.0
    finetune_batch_points: int = 8_000
    finetune_lartpc_batch_points: int = 20_000
    finetune_lr: float = 5e-4
    mode: str = "full"
    pretrained_mode: Optional[str] = None
    n_test: int = 500
    n_lartpc_test: int = 150
    eval_batch_points: int = 50_000
    accelerator: str = "cpu"
    threads: Optional[int] = 2


CONFIGS: dict[str, dict] = {
    # 2 CPU cores, under 30 minutes: the tiny backbone, 100 and 1000 labels, 3 seeds, 42 fine-tunes.
    # Measured on 1 thread of an EPYC core: ds2 pretraining 330 s, LArTPC 70 s, one fine-tune
    # 38 s (pid), 30 s (regression), 20 s (segmentation) with its evaluation: about 27 min in all.
    "cpu": {},
    # one GPU (accelerator "auto", bf16): the model-scale study with 10,000 labels, 189 fine-tunes.
    # Not run yet: time it first with --models tiny --seeds 0.
    "gpu": dict(models=["tiny", "small", "base"], seeds=[0, 1, 2], n_labels=[100, 1000, 10_000],
                pretrain_steps=20_000, pretrain_lartpc_steps=10_000, pretrain_batch_points=100_000,
                pretrain_lr=5e-4, n_source=50_000, n_lartpc_pretrain=10_000, finetune_steps=1000,
                finetune_lartpc_steps=1000, finetune_batch_points=50_000, finetune_lartpc_batch_points=100_000,
                n_test=5000, n_lartpc_test=1000, eval_batch_points=200_000, accelerator="auto", threads=None),
    # the smoke test: seconds, every code path, meaningless numbers.
    "micro": dict(models=[{"preset": "tiny", "depth": 1}], seeds=[0], n_labels=[6, 12],
                  target_labels=(6, 12), energy_range=(1e3, 5e3), lartpc_points=(200, 400), pretrain_steps=3,
                  pretrain_lartpc_steps=3, pretrain_batch_points=4000, n_source=40, n_lartpc_pretrain=12,
                  finetune_steps=3, finetune_lartpc_steps=3, finetune_batch_points=3000,
                  finetune_lartpc_batch_points=3000, n_test=24, n_lartpc_test=8, eval_batch_points=5000,
                  threads=1),
}


def model_label(model: Any) -> str:
    """A folder-safe name of a backbone: the preset, or a hash of a dict of overrides."""
    if isinstance(model, str):
        return model
    text = json.dumps(model, sort_keys=True)
    preset = model.get("preset", "custom") if isinstance(model, dict) else "custom"
    return f"{preset}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ----------------------------------------------------------------------------- data


def pool_size(config: Config) -> int:
    """Labelled pool: the largest ``n`` plus what pcfm.finetune holds out for itself."""
    largest = max(config.n_labels)
    return int(math.ceil((largest + 5) / (1 - INTERNAL_TEST_FRACTION))) + 5


def particles_of(domain: str, config: Config) -> tuple:
    return PARTICLES if domain == "pid" else tuple(config.regression_particles)


def simulate(domain: str, n: int, seed: int, config: Config) -> EventList:
    """``n`` events of a domain (target-geometry showers or LArTPC events) as a list of Data."""
    if domain == "lartpc":
        points = tuple(config.lartpc_points) if config.lartpc_points else None
        events = simulate_pretraining_events(LARTPC_GEOMETRY, n, lartpc_points=points, seed=seed)
    else:
        events = simulate_pretraining_events(config.target_geometry, n, particles=particles_of(domain, config),
                                             energy_range=tuple(config.energy_range), seed=seed)
    return EventList([events[i] for i in range(len(events))])


def domain_settings(domain: str, config: Config) -> dict:
    """What a domain's simulated pool and test set depend on (part of every run's settings)."""
    if domain == "lartpc":
        return as_json({"geometry": LARTPC_GEOMETRY, "lartpc_points": config.lartpc_points,
                           "n_pool": pool_size(config), "n_test": config.n_lartpc_test,
                           "seeds": [SEED_POOL[domain], SEED_TEST[domain]]})
    return as_json({"geometry": config.target_geometry, "particles": particles_of(domain, config),
                       "energy_range": config.energy_range, "n_pool": pool_size(config), "n_test": config.n_test,
                       "seeds": [SEED_POOL[domain], SEED_TEST[domain]]})


class Domains:
    """The simulated pool and test set of each domain, each simulated on first use only (a rerun
    whose fine-tunes are all reused simulates at most the regression test set, for the leak check)."""

    def __init__(self, config: Config):
        self.config, self.pools, self.tests = config, {}, {}

    def _simulate(self, domain: str, what: str, n: int, seed: int) -> EventList:
        start = time.perf_counter()
        events = simulate(domain, n, seed, self.config)
        where = LARTPC_GEOMETRY if domain == "lartpc" else self.config.target_geometry
        log(f"[data] {domain}: simulated the {what} ({len(events)} events on {where}) in "
            f"{time.perf_counter() - start:.1f} s")
        return events

    def pool(self, domain: str) -> EventList:
        if domain not in self.pools:
            self.pools[domain] = self._simulate(domain, "labelled pool", pool_size(self.config), SEED_POOL[domain])
        return self.pools[domain]

    def test(self, domain: str) -> EventList:
        if domain not in self.tests:
            n_test = self.config.n_lartpc_test if domain == "lartpc" else self.config.n_test
            self.tests[domain] = self._simulate(domain, "test set", n_test, SEED_TEST[domain])
        return self.tests[domain]


# ----------------------------------------------------------------------------- pretraining


def pretrain_settings(source: str, model: Any, config: Config) -> dict:
    if source == "showers":
        return as_json({"source": source, "model": model, "geometry": config.source_geometries,
                           "particles": PARTICLES, "energy_range": config.energy_range, "n_events": config.n_source,
                           "steps": config.pretrain_steps, "batch_points": config.pretrain_batch_points,
                           "lr": config.pretrain_lr, "seed": SEED_SOURCE, "accelerator": config.accelerator})
    return as_json({"source": source, "model": model, "geometry": LARTPC_GEOMETRY,
                       "lartpc_points": config.lartpc_points, "n_events": config.n_lartpc_pretrain,
                       "steps": config.pretrain_lartpc_steps, "batch_points": config.pretrain_batch_points,
                       "lr": config.pretrain_lr, "seed": SEED_LARTPC_PRETRAIN, "accelerator": config.accelerator})


def run_pretraining(source: str, model: Any, config: Config, workdir: Path) -> dict:
    """MPM pretraining of ``model`` on ``source``; reused when finished in ``workdir`` with the same
    settings, resumed when interrupted, started afresh when the settings differ."""
    folder = workdir / "pretrain" / source / model_label(model)
    settings = pretrain_settings(source, model, config)
    record_file = folder / "settings.json"
    stored = json.loads(record_file.read_text()) if record_file.is_file() else {}
    checkpoint = folder / "checkpoints" / "last.ckpt"
    name = f"[pretrain {source} {model_label(model)}]"
    if stored.get("settings") == settings and stored.get("done") and checkpoint.is_file():
        log(f"{name} reused from {folder} ({stored['summary']['seconds']:.0f} s when it ran)")
        return {**stored["summary"], "reused": True}
    if stored.get("settings") != settings and folder.exists():
        shutil.rmtree(folder)
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "done": False}))
    steps = settings["steps"]
    geometry = settings["geometry"]
    log(f"{name} masked point modelling on {geometry if isinstance(geometry, str) else ' + '.join(geometry)}: "
        f"{settings['n_events']} events, {steps} steps, "
        f"batches of {settings['batch_points']} points, in {folder}")
    options = {"particles": PARTICLES, "energy_range": tuple(config.energy_range)} if source == "showers" else {
        "lartpc_points": tuple(config.lartpc_points) if config.lartpc_points else None}
    start = time.perf_counter()
    result = pretrain("mpm", geometry=geometry, model=model, max_steps=steps, batch_points=settings["batch_points"],
                      lr=settings["lr"], n_events=settings["n_events"], val_fraction=0.05, workdir=folder,
                      resume=True, accelerator=config.accelerator, devices=1, seed=settings["seed"], progress=False,
                      log_every_n_steps=max(1, min(50, steps // 20)),
                      checkpoint_every_n_steps=max(1, min(500, steps // 4)), data_options=options)
    seconds = time.perf_counter() - start
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    summary = {"source": source, "model": model_label(model),
               "geometry": geometry if isinstance(geometry, str) else "+".join(geometry), "steps": steps,
               "n_events": settings["n_events"], "seconds": round(seconds, 1),
               "seconds_per_step": round(seconds / max(1, steps), 4), "first_loss": losses[0] if losses else None,
               "final_loss": float(np.mean(losses[-3:])) if losses else None,
               "val_loss": result.metrics.get("val/loss"), "checkpoint": str(result.checkpoint_path)}
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "done": True, "summary": summary}))
    log(f"{name} done in {seconds:.0f} s ({summary['seconds_per_step']:.3f} s/step), loss "
        f"{fmt(summary['first_loss'])} -> {fmt(summary['final_loss'])}, validation {fmt(summary['val_loss'])}")
    return {**summary, "reused": False}


# ----------------------------------------------------------------------------- fine-tuning


def evaluate_on(module, dataset, task: str, targets, batch_points: int, device: str) -> dict:
    """:func:`~pcfm.tasks.finetune.task_metrics` of ``module`` on every event of ``dataset``."""
    spec_field = {"classification": "y", "segmentation": "semantic"}.get(task)
    sizes = event_sizes(dataset)
    indices = np.flatnonzero(sizes >= 1)
    loader = DataLoader(LabelledView(dataset, indices, spec_field),
                        batch_sampler=PointBudgetBatchSampler(sizes[indices], batch_points, shuffle=False))
    module = module.to(device).eval()
    predictions, truths = [], []
    with torch.no_grad():
        for batch in loader:
            out = module.predict(batch.to(device))
            predictions.append(out["prediction"].cpu())
            truths.append(out["truth"].cpu())
    metrics = task_metrics(task, torch.cat(predictions).numpy(), torch.cat(truths).numpy(), targets)
    metrics["n_test"] = int(len(indices))
    return metrics


def target_leak(module, dataset, task: str, device: str, targets: tuple[str, ...] = ("incident_energy",),
                n_events: int = 32) -> Optional[dict]:
    """Regression: the largest change of the (standardised) outputs of ``n_events`` test events when
    only the true values of the model's targets change (energy x2, angle + 0.1 rad; a field that
    is not a target, such as a known angle, is a legitimate input and stays), and whether it
    exceeds :data:`LEAK_THRESHOLD` and the run-to-run noise: then the model reads its label."""
    if task != "regression":
        return None
    indices = np.arange(min(n_events, len(dataset)))
    batch = next(iter(DataLoader(LabelledView(dataset, indices, None), batch_size=len(indices)))).to(device)
    changed = batch.clone()
    if "incident_energy" in targets:
        changed.incident_energy = batch.incident_energy * 2.0
    if "theta" in targets:
        changed.theta = batch.theta + 0.1
    module = module.to(device).eval()
    with torch.no_grad():
        reference = module(batch).float()
        noise = float((module(batch).float() - reference).abs().max())  # non-deterministic kernels
        change = float((module(changed).float() - reference).abs().max())
    return {"change": change, "detected": change > max(LEAK_THRESHOLD, 10 * noise)}


def calibration_baseline(domains: Domains, config: Config) -> list[dict]:
    """Regression reference without a network: log E = a log E_visible + b by least squares on
    ``n`` pool events (seeded random subsets), scored on the regression test set."""
    def visible_and_true(events) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(float(e.energy.sum()), float(e.incident_energy)) for e in events]
        return tuple(np.log(np.array(column)) for column in zip(*pairs))

    test_x, test_y = visible_and_true(domains.test(TASKS["regression"].domain))
    pool = domains.pool(TASKS["regression"].domain)
    rows = []
    for n in config.n_labels:
        for seed in config.seeds:
            picks = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
            x, y = visible_and_true([pool[int(i)] for i in picks])
            slope, intercept = np.polyfit(x, y, 1)
            metrics = task_metrics("regression", np.exp(slope * test_x + intercept)[:, None], np.exp(test_y)[:, None],
                                   ("incident_energy",))
            rows.append({"part": "baseline", "task": "regression", "arm": "visible-energy calibration",
                         "n_labels": n, "seed": seed, "metrics": {**metrics, "n_test": int(test_x.size)}})
    return rows


def finetune_steps(spec: TaskSpec, n: int, config: Config) -> int:
    """Fine-tune steps with ``n`` labels: the configured steps at the smallest label count, times
    ``(n / smallest) ** label_step_exponent`` (0: the same steps for every n; 0.5: ten times the
    labels get about three times the steps, so a larger training set is not cut short)."""
    base = config.finetune_lartpc_steps if spec.domain == "lartpc" else config.finetune_steps
    return max(1, round(base * (n / min(config.n_labels)) ** config.label_step_exponent))


def run_settings(spec: TaskSpec, init: str, model: Any, n: int, seed: int, config: Config,
                 pretrain_record: Optional[dict]) -> dict:
    lartpc = spec.domain == "lartpc"
    return as_json({
        "task": spec.finetune_task, "init": init, "model": model,
        "pretraining": None if pretrain_record is None else pretrain_settings(init, model, config),
        "n_labels": n, "seed": seed, "mode": arm_mode(init, config),
        "steps": finetune_steps(spec, n, config),
        "batch_points": config.finetune_lartpc_batch_points if lartpc else config.finetune_batch_points,
        "lr": config.finetune_lr, "data": domain_settings(spec.domain, config), "accelerator": config.accelerator,
    })


def arm_mode(init: str, config: Config) -> str:
    return config.mode if init == "scratch" else (config.pretrained_mode or config.mode)


def run_finetune(spec: TaskSpec, init: str, model: Any, n: int, seed: int, config: Config, workdir: Path,
                 domains: Domains, pretrain_record: Optional[dict]) -> dict:
    """One fine-tune (or its record, when it finished before with the same settings): the metrics
    on the task's fixed test set, times, and the label-leak check."""
    folder = workdir / "finetune" / spec.finetune_task / model_label(model) / init / f"n{n}_seed{seed}"
    settings = run_settings(spec, init, model, n, seed, config, pretrain_record)
    record_file = folder / RUN_RECORD
    if record_file.is_file() and (folder / "metrics.json").is_file():
        stored = json.loads(record_file.read_text())
        if stored.get("settings") == settings:
            record = stored["result"]
            if spec.finetune_task == "regression":  # the check belongs to this code, not the run's
                record = {**record, "label_leak": recheck_leak(spec, folder, domains, device_for(config.accelerator))}
            return {**record, "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    pool, test = domains.pool(spec.domain), domains.test(spec.domain)
    device = device_for(config.accelerator)
    targets = ("incident_energy",)
    start = time.perf_counter()
    result = finetune(spec.finetune_task, data=pool, checkpoint=None if pretrain_record is None
                      else pretrain_record["checkpoint"], model=model, mode=settings["mode"], n_labels=n,
                      targets=targets, test_fraction=INTERNAL_TEST_FRACTION, val_fraction=0.0,
                      max_steps=settings["steps"], batch_points=settings["batch_points"], lr=settings["lr"],
                      workdir=folder, seed=seed, accelerator=config.accelerator, devices=1, progress=False,
                      log_every_n_steps=max(1, min(50, settings["steps"] // 10)))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_on(result.module, test, spec.finetune_task, targets, config.eval_batch_points, device)
    leak = target_leak(result.module, test, spec.finetune_task, device, targets)
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    record = {"metrics": metrics, "n_train": result.metrics.get("n_train"), "train_seconds": round(train_seconds, 2),
              "eval_seconds": round(time.perf_counter() - start, 2), "steps": settings["steps"],
              "mode": settings["mode"], "final_train_loss": float(np.mean(losses[-3:])) if losses else None,
              "label_leak": leak, "folder": str(folder)}
    with atomic_path(record_file) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "result": record}, allow_nan=True))
    return {**record, "reused": False}


def recheck_leak(spec: TaskSpec, folder: Path, domains: Domains, device: str) -> Optional[dict]:
    """The label-leak check of a finished fine-tune, done again on its saved final weights."""
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        return None
    module = FinetuneModule.load_from_checkpoint(checkpoint, map_location="cpu")
    return target_leak(module, domains.test(spec.domain), spec.finetune_task, device, tuple(module.hparams.targets))


def leaked(run: dict) -> bool:
    return bool((run.get("label_leak") or {}).get("detected"))


def arms_of(task: str) -> list[tuple[str, str]]:
    """(arm, init) pairs of a task: the pretrained arm first, then scratch."""
    return [("pretrained", TASKS[task].pretrained_from), ("scratch", "scratch")]


def planned_runs(config: Config) -> list[tuple[str, str, str, Any, int, int]]:
    """(task, arm, init, model, n, seed) of every row, in running order: models, seeds, n, tasks."""
    return [(task, arm, init, model, n, seed) for model in config.models for seed in config.seeds
            for n in config.n_labels for task in config.tasks for arm, init in arms_of(task)]


# ----------------------------------------------------------------------------- aggregation and verdict


def aggregate(rows: list[dict], config: Config) -> list[dict]:
    """Mean and spread (sample std over seeds; 0 with one seed) per (task, model, arm, n)."""
    out = []
    for task in config.tasks:
        spec = TASKS[task]
        for model in config.models:
            for arm, init in arms_of(task):
                for n in config.n_labels:
                    runs = [r for r in rows if r.get("part") == "run" and r["task"] == task and r["arm"] == arm
                            and r["model"] == model_label(model) and r["n_labels"] == n]
                    if not runs:
                        continue
                    values = np.array([r["metrics"][spec.metric] for r in runs], dtype=float)
                    row = {"part": "aggregate", "task": task, "model": model_label(model), "arm": arm, "init": init,
                           "n_labels": n, "metric": spec.metric, "higher_is_better": spec.higher_is_better,
                           "n_seeds": len(runs), "mean": float(values.mean()),
                           "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                           "values": values.tolist(),
                           "label_leak": any(leaked(r) for r in runs)}
                    for name in spec.secondary:
                        extra = np.array([r["metrics"].get(name, math.nan) for r in runs], dtype=float)
                        row[name + "_mean"] = float(extra.mean())
                        row[name + "_std"] = float(extra.std(ddof=1)) if len(extra) > 1 else 0.0
                    out.append(row)
    return out


def target_checks(aggregates: list[dict], config: Config) -> list[dict]:
    """Pretrained at the fewer labels against scratch at the more labels, per task and model."""
    low, high = config.target_labels
    checks = []
    for task in config.tasks:
        spec = TASKS[task]
        for model in config.models:
            pick = lambda arm, n: next((a for a in aggregates if a["task"] == task and a["arm"] == arm  # noqa: E731
                                        and a["model"] == model_label(model) and a["n_labels"] == n), None)
            pretrained, scratch = pick("pretrained", low), pick("scratch", high)
            row = {"part": "target", "task": task, "model": model_label(model), "metric": spec.metric,
                   "pretrained_labels": low, "scratch_labels": high, "in_verdict": task in VERDICT_TASKS}
            if pretrained is None or scratch is None:
                checks.append({**row, "met": None, "note": f"not measured: needs n_labels {low} and {high}"})
                continue
            sign = 1.0 if spec.higher_is_better else -1.0
            advantage = sign * (pretrained["mean"] - scratch["mean"])  # > 0: pretrained better
            error = math.sqrt(pretrained["std"] ** 2 / pretrained["n_seeds"] + scratch["std"] ** 2 / scratch["n_seeds"])
            leak = pretrained["label_leak"] or scratch["label_leak"]
            notes = ["INVALID: the model's outputs change with the true target (label leak)"] if leak else []
            scratch_low = pick("scratch", low)
            if scratch_low is not None and low != high:
                row["scratch_gain"] = sign * (scratch["mean"] - scratch_low["mean"])
                if row["scratch_gain"] <= math.sqrt(scratch["std"] ** 2 / scratch["n_seeds"]
                                                    + scratch_low["std"] ** 2 / scratch_low["n_seeds"]):
                    notes.append(f"scratch does not improve from {low} to {high} labels: at this step budget "
                                 f"more labels do not help it")
            row.update(pretrained_mean=pretrained["mean"], pretrained_std=pretrained["std"],
                       scratch_mean=scratch["mean"], scratch_std=scratch["std"], advantage=advantage,
                       standard_error=error, beats=advantage > 0, met=advantage >= -error, valid=not leak,
                       note="; ".join(notes))
            checks.append(row)
    return checks


def verdict(checks: list[dict], config: Config) -> dict:
    """Per model: how many of the three tasks meet the target (valid checks only): met on two or
    more; None when tasks not measured could still decide it. Overall: met when some model meets
    it, not met when none can, else None."""
    per_model = {}
    for model in config.models:
        name = model_label(model)
        mine = [c for c in checks if c["model"] == name and c["in_verdict"] and c.get("met") is not None]
        met = [c["task"] for c in mine if c["met"] and c.get("valid", True)]
        unchecked = len(VERDICT_TASKS) - len(mine)
        decided = True if len(met) >= 2 else (False if len(met) + unchecked < 2 else None)
        per_model[name] = {"tasks_checked": [c["task"] for c in mine], "tasks_met": met,
                           "tasks_invalid": [c["task"] for c in mine if not c.get("valid", True)],
                           "met": decided}
    low, high = config.target_labels
    return {"rule": f"pretrained with {low} labels matches or beats scratch with {high} labels (mean over seeds, "
                    f"within one standard error) on at least two of {', '.join(VERDICT_TASKS)}; tasks with a label "
                    f"leak do not count",
            "per_model": per_model, "models_meeting": [m for m, v in per_model.items() if v["met"]],
            "met": True if any(v["met"] for v in per_model.values()) else
            (False if all(v["met"] is False for v in per_model.values()) else None)}


# ----------------------------------------------------------------------------- plot and report


def make_plot(aggregates: list[dict], config: Config, path: Path) -> Optional[str]:
    """Metric against labels per task (log x), pretrained vs scratch, error bars = std over seeds.
    Returns why it was skipped, or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed"
    tasks = [t for t in config.tasks if any(a["task"] == t for a in aggregates)]
    if not tasks:
        return "no results"
    from matplotlib.ticker import NullFormatter

    columns = min(2, len(tasks))
    rows = int(math.ceil(len(tasks) / columns))
    fig = Figure(figsize=(5.2 * columns, 3.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    markers = "osD^v"
    low, high = config.target_labels
    for ax, task in zip(axes, tasks):
        spec = TASKS[task]
        for k, model in enumerate(config.models):
            mine = [a for a in aggregates if a["task"] == task and a["model"] == model_label(model)]
            for arm, colour in (("pretrained", "C0"), ("scratch", "C1")):
                points = sorted((a["n_labels"], a["mean"], a["std"]) for a in mine if a["arm"] == arm)
                if points:
                    n, mean, std = zip(*points)
                    ax.errorbar(n, mean, yerr=std, fmt=markers[k % len(markers)] + "-", color=colour, capsize=3,
                                alpha=1.0 - 0.3 * k / max(1, len(config.models) - 1),
                                label=f"{model_label(model)} {arm}"
                                      + (f" (from {spec.pretrained_from})" if arm == "pretrained" else ""))
            reference = [a["mean"] for a in mine if a["arm"] == "scratch" and a["n_labels"] == high]
            if reference and len(config.models) == 1:
                ax.axhline(reference[0], color="grey", linestyle=":", linewidth=1,
                           label=f"scratch @ {high} (target level)")
        ax.set_xscale("log")
        ax.set_xticks(sorted(config.n_labels), [str(n) for n in sorted(config.n_labels)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labelled training events")
        ax.set_ylabel(spec.metric + (" (lower is better)" if not spec.higher_is_better else ""))
        ax.set_title(f"{task}: {spec.label}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    save_png(fig, path)
    return None


AGGREGATE_COLUMNS = [("task", "task", ""), ("model", "model", ""), ("arm", "arm", ""), ("init", "init", ""),
                     ("labels", "n_labels", "d"), ("metric", "metric", ""), ("mean", "mean", ".4f"),
                     ("std", "std", ".4f"), ("seeds", "n_seeds", "d"), ("macro F1", "mean_f1_mean", ".4f"),
                     ("E bias", "incident_energy/bias_mean", ".4f"), ("point acc.", "accuracy_mean", ".4f")]
TARGET_COLUMNS = [("task", "task", ""), ("model", "model", ""), ("metric", "metric", ""),
                  ("pretrained @ fewer", "pretrained_mean", ".4f"), ("scratch @ more", "scratch_mean", ".4f"),
                  ("advantage", "advantage", "+.4f"), ("std. error", "standard_error", ".4f"),
                  ("scratch gain fewer -> more", "scratch_gain", "+.4f"),
                  ("met", "met", ""), ("valid", "valid", ""), ("note", "note", "")]
PRETRAIN_COLUMNS = [("source", "source", ""), ("model", "model", ""), ("geometry", "geometry", ""),
                    ("events", "n_events", "d"), ("steps", "steps", "d"), ("s", "seconds", ".0f"),
                    ("s/step", "seconds_per_step", ".3f"), ("first loss", "first_loss", ".3f"),
                    ("final loss", "final_loss", ".3f"), ("val. loss", "val_loss", ".3f"), ("reused", "reused", "")]


def report(rows: list[dict], config_name: str, config: Config, command: str, machine: dict, plot: Optional[str]) -> str:
    summary = next(r for r in rows if r.get("part") == "summary")
    aggregates = [r for r in rows if r.get("part") == "aggregate"]
    checks = [r for r in rows if r.get("part") == "target"]
    runs = [r for r in rows if r.get("part") == "run"]
    low, high = config.target_labels
    lines = ["## Transfer across geometries (`benchmarks/transfer.py`)", "",
             f"`{command}` — {machine.get('gpu', machine.get('cpu'))}, {machine.get('threads')} threads, "
             f"torch {machine.get('torch')}; config `{config_name}`; {summary['total_wall_s']:.0f} s in all "
             f"({summary['runs_fresh']} fine-tunes run now, {summary['runs_reused']} reused from the workdir).", "",
             f"Pretraining: masked point modelling on {', '.join(config.source_geometries)} "
             f"({', '.join(PARTICLES)}, {config.energy_range[0] / 1e3:g}-{config.energy_range[1] / 1e3:g} GeV) and on "
             f"{LARTPC_GEOMETRY}. Fine-tuning on the unseen {config.target_geometry} (pid: {', '.join(PARTICLES)}; "
             f"regression: {', '.join(config.regression_particles)}) and on "
             f"{LARTPC_GEOMETRY} (segmentation), mode {config.mode}"
             + (f" (pretrained arm: {config.pretrained_mode})" if config.pretrained_mode else "")
             + f", lr {config.finetune_lr:g}, {config.finetune_steps} steps of {config.finetune_batch_points} points "
             f"(LArTPC: {config.finetune_lartpc_steps} of {config.finetune_lartpc_batch_points})"
             + (f" at {min(config.n_labels)} labels, times (n / {min(config.n_labels)})^"
                f"{config.label_step_exponent:g} at n labels" if config.label_step_exponent else "")
             + f"; the same for both arms. Test sets: {config.n_test} {config.target_geometry} and {config.n_lartpc_test} LArTPC events, "
             f"fixed, simulated apart. Seeds {config.seeds} (labels and initialisation).", ""]
    if config_name != "gpu":
        lines += ["**Not the full study (`--config gpu`: tiny/small/base, up to 10,000 labels).**", ""]
    lines += ["### Pretraining", "", markdown_table(summary["pretraining"], PRETRAIN_COLUMNS), "",
              "### Mean and spread over seeds", "", markdown_table(aggregates, AGGREGATE_COLUMNS), "",
              f"### Target: pretrained @ {low} labels vs scratch @ {high} labels", "",
              "advantage > 0: pretrained better; met: advantage >= -(standard error of the difference); scratch "
              "gain: what ten times the labels bring the scratch model (> 0: better).", "",
              markdown_table(checks, TARGET_COLUMNS), ""]
    baseline = [r for r in rows if r.get("part") == "baseline"]
    if baseline:
        metric = TASKS["regression"].metric
        lines += ["Regression reference without a network (least squares of log E on log E_visible, n random pool "
                  "events, the same test set): " + "; ".join(
                      f"n = {n}: {metric} {np.mean(values):.4f} ± {np.std(values):.4f}"
                      for n in sorted({r["n_labels"] for r in baseline})
                      for values in [[r["metrics"][metric] for r in baseline if r["n_labels"] == n]]) + ".", ""]
    result = summary["verdict"]
    for model, entry in result["per_model"].items():
        lines.append(f"- {model}: met on {entry['tasks_met'] or 'none'} of {entry['tasks_checked']}"
                     + (f"; invalid (label leak): {entry['tasks_invalid']}" if entry["tasks_invalid"] else "")
                     + f" -> {decision(entry['met']).upper()}")
    lines += ["", f"**Verdict: {decision(result['met'])}** ({result['rule']}).", ""]
    leaks = sorted({(r["task"], r["arm"]) for r in runs if leaked(r)})
    if leaks:
        worst = max(r["label_leak"]["change"] for r in runs if leaked(r))
        lines += [f"Label leak: the regression model's outputs change (up to {worst:.3g} standardised units) when "
                  "only the event's true target fields change: the backbone reads what regression is asked to "
                  "predict (pcfm.finetune hides the targets from the event conditioning with hide_condition; "
                  f"that has broken, or another path leaks). Rows {leaks} measure nothing until that is fixed.", ""]
    lines.append(f"![transfer]({Path(plot).name})" if plot else f"Plot skipped: {summary.get('plot_skipped')}.")
    return "\n".join(lines) + "\n"


def decision(met: Optional[bool]) -> str:
    return {True: "met", False: "not met", None: "undecided (tasks not measured)"}[met]


# ----------------------------------------------------------------------------- command line


OPTION_HELP = {
    "models": "backbone presets (or JSON dicts of pcfm.pretrain's model argument)",
    "seeds": "fine-tune seeds (label subset and initialisation)", "n_labels": "labelled training events",
    "target_labels": "the target's pair: pretrained at the first, scratch at the second",
    "tasks": f"tasks among {list(TASKS)}", "source_geometries": "pretraining geometries (showers)",
    "target_geometry": "unseen geometry of pid and regression", "energy_range": "incident energies, MeV, LO HI",
    "regression_particles": "particles of the regression events (electron, photon, pion)",
    "lartpc_points": "grow / cut simulated LArTPC events to LO HI points (default: as simulated)",
    "pretrain_steps": "MPM steps on the source showers", "pretrain_lartpc_steps": "MPM steps on LArTPC events",
    "pretrain_batch_points": "point budget of a pretraining batch", "pretrain_lr": "pretraining peak lr",
    "n_source": "simulated events per source geometry", "n_lartpc_pretrain": "simulated LArTPC pretraining events",
    "finetune_steps": "fine-tune steps (showers) at the smallest n_labels",
    "finetune_lartpc_steps": "fine-tune steps (LArTPC) at the smallest n_labels",
    "label_step_exponent": "steps grow as (n_labels / smallest) ** this (0: equal steps for every n_labels)",
    "finetune_batch_points": "point budget of a fine-tune batch (showers)",
    "finetune_lartpc_batch_points": "point budget of a fine-tune batch (LArTPC)",
    "finetune_lr": "fine-tune head lr (and backbone lr in full mode)",
    "mode": "fine-tune mode (linear, full, layerwise)",
    "pretrained_mode": "fine-tune mode of the pretrained arm (default: --mode)",
    "n_test": "fixed test events (target geometry)", "n_lartpc_test": "fixed test events (LArTPC)",
    "eval_batch_points": "point budget of a test batch", "accelerator": "cpu, gpu or auto",
    "threads": "torch CPU threads (0: torch's default)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="size preset (default cpu)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="runs and checkpoints (default pcfm_runs/transfer_CONFIG)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (.md and .png go beside it)")
    add_config_options(parser, Config, OPTION_HELP, special={
        "models": {"type": parse_json_or_text, "nargs": "+"}, "tasks": {"choices": list(TASKS), "nargs": "+"},
        "lartpc_points": {"type": int, "nargs": 2}, "threads": {"type": int}, "pretrained_mode": {"type": str}})
    return parser


def resolve(args) -> Config:
    config = apply_config_options(Config(**CONFIGS[args.config]), args, tuple_fields=("lartpc_points",))
    if config.target_geometry in config.source_geometries:
        raise SystemExit(f"the target geometry {config.target_geometry!r} is among the pretraining geometries: "
                         f"it would not be unseen")
    unknown = set(config.regression_particles) - set(PARTICLES)
    if unknown:
        raise SystemExit(f"unknown regression particle(s) {sorted(unknown)}; choose from {list(PARTICLES)}")
    for mode in (config.mode, config.pretrained_mode):
        if mode is not None and mode not in ("linear", "full", "layerwise"):
            raise SystemExit(f"unknown fine-tune mode {mode!r}")
    return config


def quiet_lightning() -> None:
    """Keep the per-run progress readable: Lightning's banners and known-harmless warnings off."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*Total length of .* across ranks is zero.*",
                    ".*custom batch sampler.*", ".*`max_epochs` was not set.*", ".*LeafSpec.*",
                    ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    config = resolve(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    quiet_lightning()
    start = time.perf_counter()
    command, machine = announce()
    name = "transfer" if args.config == "cpu" else f"transfer_{args.config}"
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    workdir = Path(args.workdir or f"pcfm_runs/transfer_{args.config}")
    settings = as_json(dataclasses.asdict(config))
    log(f"config {args.config}: {json.dumps(settings)}")

    pretrainings, records = [], {}
    sources = {TASKS[task].pretrained_from for task in config.tasks}
    for model in config.models:
        for source in ("showers", "lartpc"):
            if source in sources:
                record = run_pretraining(source, model, config, workdir)
                records[(source, model_label(model))] = record
                pretrainings.append(record)
    log(f"[pretrain] done at {clock(time.perf_counter() - start)}")

    domains, done, rows = Domains(config), {}, []
    plan = planned_runs(config)
    unique = {(TASKS[t].finetune_task, i, model_label(m), n, s) for t, _, i, m, n, s in plan}
    log(f"[finetune] {len(plan)} rows from {len(unique)} fine-tunes")
    finetune_start, fresh_seconds = time.perf_counter(), []
    for task, arm, init, model, n, seed in plan:
        spec = TASKS[task]
        key = (spec.finetune_task, init, model_label(model), n, seed)
        if key not in done:
            record = None if init == "scratch" else records[(init, model_label(model))]
            result = done[key] = run_finetune(spec, init, model, n, seed, config, workdir, domains, record)
            if not result["reused"]:
                fresh_seconds.append(result["train_seconds"] + result["eval_seconds"])
            left = len(unique) - len(done)
            eta = f", about {clock(left * np.mean(fresh_seconds))} to go" if fresh_seconds and left else ""
            log(f"[{len(done)}/{len(unique)}] {task} {model_label(model)} {arm}"
                + (f" (from {init})" if init != "scratch" else "") + f" n={n} seed={seed}: "
                + ("reused" if result["reused"]
                   else f"{result['train_seconds']:.1f} s + eval {result['eval_seconds']:.1f} s")
                + f"; {spec.metric} {result['metrics'][spec.metric]:.4f}"
                + (f" [label leak: outputs move by {result['label_leak']['change']:.3g}]" if leaked(result) else "")
                + f" (elapsed {clock(time.perf_counter() - start)}{eta})")
        result = done[key]
        rows.append({"part": "run", "task": task, "model": model_label(model), "arm": arm, "init": init,
                     "n_labels": n, "seed": seed, **result})
    baseline = calibration_baseline(domains, config) if "regression" in config.tasks else []
    aggregates = aggregate(rows, config)
    checks = target_checks(aggregates, config)
    result = verdict(checks, config)
    plot_path = out.with_suffix(".png")
    skipped = make_plot(aggregates, config, plot_path)
    summary = {"part": "summary", "config": args.config, "settings": settings, "workdir": str(workdir),
               "total_wall_s": round(time.perf_counter() - start, 1),
               "finetune_wall_s": round(time.perf_counter() - finetune_start, 1),
               "runs_fresh": sum(not r["reused"] for r in done.values()),
               "runs_reused": sum(bool(r["reused"]) for r in done.values()),
               "pretraining": pretrainings, "verdict": result,
               "plot": None if skipped else str(plot_path), "plot_skipped": skipped}
    rows = rows + baseline + aggregates + checks + [summary]
    write_results(name, command, machine, rows, out)
    text = report(rows, args.config, config, command, machine, None if skipped else str(plot_path))
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    log("")
    log(text)
    return rows


if __name__ == "__main__":
    main()
