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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import references
from _common import (RESULTS_DIR, add_config_options, announce, apply_config_options, as_json, log,
                     markdown_table, parse_json_or_text, save_png, write_results)
from pcfm.io import atomic_path

LARTPC_GEOMETRY = "lartpc-768"
TARGET_GEOMETRY = "par04-scipb"
SOURCE_GEOMETRY = "calochallenge-ds2"
PARTICLES = ("electron", "photon", "pion")


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: what is fine-tuned, on which events, from which pretraining."""

    finetune_task: str  # pcfm.finetune's task
    domain: str  # the events (Domains)
    pretrained_from: str  # "showers" or "lartpc": the pretraining of the pretrained arm
    metric: str  # primary metric (a task_metrics key)
    higher_is_better: bool
    label: str
    secondary: tuple = ()
    class_names: Optional[tuple] = None


TASKS = {
    "pid": TaskSpec("classification", "pid", "showers", "accuracy", True,
                    "e / gamma / pi identification on par04-scipb (unseen geometry)", ("mean_f1",)),
    "gamma_pi0": TaskSpec("classification", "gamma_pi0", "showers", "accuracy", True,
                          "Geant4 gamma vs pi0 in the ds2 SiW calorimeter (5 folds of 1000 showers)", ("mean_f1",),
                          class_names=("photon", "pi0")),
    "electron_energy": TaskSpec("regression", "electron_energy", "showers", "incident_energy/resolution", False,
                                "electron energy on par04-scipb (sampling floor: a sanity row)",
                                ("incident_energy/bias",)),
    "pion_energy": TaskSpec("regression", "pion_energy", "showers", "incident_energy/resolution", False,
                            "charged-pion energy on par04-scipb (shape corrects invisible energy)",
                            ("incident_energy/bias",)),
    "segmentation": TaskSpec("segmentation", "lartpc", "lartpc", "mean_f1", True,
                             "LArTPC semantic segmentation", ("accuracy",)),
}
DOMAIN_PARTICLES = {"pid": PARTICLES, "electron_energy": ("electron",), "pion_energy": ("pion",)}
ARMS = ("scratch", "pretrained", "linear")
#: Simulation seeds: pretraining data, pools, validation and test sets never share one.
SEED_SOURCE, SEED_LARTPC_PRETRAIN, SEED_COVERAGE = 0, 1, 5
SEEDS = {"pid": (201, 203, 202), "electron_energy": (211, 213, 212), "pion_energy": (221, 223, 222),
         "lartpc": (301, 303, 302)}  # (pool, validation, test)
GAMMA_PI0_FOLDS = 5
#: Output change (standardised units) above which a regression model is taken to read its target.
LEAK_THRESHOLD = 1e-4
RUN_RECORD = "transfer_run.json"


@dataclass
class Config:
    """Every size of a run; ``--config`` picks a preset, options override single fields."""

    model: Any = "tiny"
    tasks: list = field(default_factory=lambda: list(TASKS))
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    n_labels: list = field(default_factory=lambda: [100, 1000])
    curve_labels: list = field(default_factory=lambda: [300, 3000])
    curve_seeds: list = field(default_factory=lambda: [0, 1])
    arms: list = field(default_factory=lambda: list(ARMS))
    arm_labels: dict = field(default_factory=lambda: {"linear": [100, 1000]})
    references: bool = True
    energy_range: tuple = (1e3, 1e5)
    lartpc_points: Optional[tuple] = None
    pool_factor: float = 2.0
    n_val: int = 400
    n_lartpc_val: int = 100
    n_test: int = 2000
    n_lartpc_test: int = 300
    gamma_pi0_per_class: Optional[int] = None
    # pretraining
    pretrain_steps: int = 1500
    pretrain_lartpc_steps: int = 800
    pretrain_batch_points: int = 20_000
    pretrain_lr: float = 1e-3
    n_source: int = 6000
    n_lartpc_pretrain: int = 1500
    # fine-tuning: max steps at each label count (the lowest validation loss is kept)
    steps_at: dict = field(default_factory=lambda: {"100": 300, "300": 400, "1000": 600, "3000": 800})
    # per task, tables that replace steps_at: gamma/pi0 from scratch sits at chance (loss ln 2) for
    # 200-350 steps before it finds the signal (seen on the validation loss of folds 0 and 1)
    task_steps_at: dict = field(default_factory=lambda: {"gamma_pi0": {"100": 800, "600": 1000}})
    # early stopping cannot end a run before this fraction of its step budget
    min_steps_fraction: float = 0.5
    batch_points: int = 20_000
    lartpc_batch_points: int = 20_000
    lr_grid: list = field(default_factory=lambda: [1e-3, 3e-3])
    linear_lr_grid: list = field(default_factory=lambda: [3e-3, 1e-2])
    select_labels: int = 100
    val_every: int = 50
    patience: int = 4
    augment: bool = True
    max_reference_points: int = 100_000
    n_coverage: int = 200
    workers: int = 2
    threads: int = 1


CONFIGS: dict[str, dict] = {
    # 2 CPU cores: the tiny backbone, every task; see RESULTS.md for what one run of it costs.
    "cpu": {},
    # the smoke test: seconds, every code path, meaningless numbers.
    "micro": dict(model={"preset": "tiny", "depth": 1}, tasks=list(TASKS), seeds=[0, 1], n_labels=[6, 12],
                  curve_labels=[9], curve_seeds=[0], arm_labels={"linear": [6]}, energy_range=(1e3, 5e3),
                  lartpc_points=(200, 400), gamma_pi0_per_class=20, n_val=12, n_lartpc_val=6, n_test=24, n_lartpc_test=8,
                  pretrain_steps=3, pretrain_lartpc_steps=3, pretrain_batch_points=4000, n_source=40,
                  n_lartpc_pretrain=12, steps_at={"6": 4, "9": 4, "12": 6}, task_steps_at={}, batch_points=3000,
                  lartpc_batch_points=3000, lr_grid=[1e-3, 3e-3], linear_lr_grid=[1e-2], select_labels=6,
                  val_every=2, patience=2, max_reference_points=2000, n_coverage=6, workers=1, threads=1),
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


def steps_for(n: int, config: Config, task: Optional[str] = None) -> int:
    """Maximum fine-tune steps with ``n`` labels: the entry of the task's table (``task_steps_at``,
    else ``steps_at``) at the nearest label count at or below ``n`` (the smallest one below all)."""
    table = sorted((int(k), int(v)) for k, v in config.task_steps_at.get(task, config.steps_at).items())
    below = [steps for count, steps in table if count <= n]
    return below[-1] if below else table[0][1]


def label_counts(task: str, config: Config) -> list[int]:
    """Label counts of a task: the main ones and the curve, capped at what its pool holds
    (gamma_pi0: 600 per fold)."""
    counts = sorted(set(config.n_labels) | set(config.curve_labels))
    if TASKS[task].domain == "gamma_pi0":
        cap = gamma_pi0_pool_size(config)
        counts = sorted({min(n, cap) for n in counts})
    return counts


# ----------------------------------------------------------------------------- data


def gamma_pi0_pool_size(config: Config) -> int:
    """Showers a gamma_pi0 fold draws its labels from: three of the five blocks."""
    total = 2 * (config.gamma_pi0_per_class or 500)
    return total - len(np.array_split(np.arange(total), GAMMA_PI0_FOLDS)[0]) * 2


def pool_size(config: Config) -> int:
    """Labelled pool of a simulated task: ``pool_factor`` times the largest label count, so that
    the seeds of even the largest count draw different events."""
    return int(math.ceil(config.pool_factor * max(set(config.n_labels) | set(config.curve_labels))))


def simulate(domain: str, n: int, seed: int, config: Config) -> list:
    """``n`` events of a simulated domain as a list of ``Data`` (labels ``y`` / ``semantic`` included)."""
    from pcfm.engine.data import simulate_pretraining_events

    if domain == "lartpc":
        points = tuple(config.lartpc_points) if config.lartpc_points else None
        events = simulate_pretraining_events(LARTPC_GEOMETRY, n, lartpc_points=points, seed=seed)
    else:
        events = simulate_pretraining_events(TARGET_GEOMETRY, n, particles=DOMAIN_PARTICLES[domain],
                                             energy_range=tuple(config.energy_range), seed=seed)
    return [events[i] for i in range(len(events))]


def read_gamma_pi0(per_class: Optional[int] = None) -> list:
    """The Geant4 photon (y = 0) and pi0 (y = 1) showers (:func:`references.read_gamma_pi0`) with
    their label as ``y``, in file order."""
    events, labels = references.read_gamma_pi0(per_class=per_class)
    for event, label in zip(events, labels):
        event.y = torch.tensor([int(label)])
    return events


def gamma_pi0_fold(n_events: int, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool, validation, test) indices of fold ``fold``: a fixed shuffle cut in five blocks; test is
    block ``fold``, validation the next one, the pool the other three."""
    order = np.random.default_rng(12345).permutation(n_events)
    blocks = np.array_split(order, GAMMA_PI0_FOLDS)
    f = fold % GAMMA_PI0_FOLDS
    pool = np.concatenate([blocks[i] for i in range(GAMMA_PI0_FOLDS) if i not in (f, (f + 1) % GAMMA_PI0_FOLDS)])
    return np.sort(pool), np.sort(blocks[(f + 1) % GAMMA_PI0_FOLDS]), np.sort(blocks[f])


def domain_settings(domain: str, config: Config) -> dict:
    """What a domain's events depend on (part of every run's settings)."""
    if domain == "gamma_pi0":
        return {"files": list(references.GAMMA_PI0_FILES), "folds": GAMMA_PI0_FOLDS, "per_class": config.gamma_pi0_per_class}
    if domain == "lartpc":
        return as_json({"geometry": LARTPC_GEOMETRY, "lartpc_points": config.lartpc_points,
                        "sizes": [pool_size(config), config.n_lartpc_val, config.n_lartpc_test],
                        "seeds": SEEDS[domain]})
    return as_json({"geometry": TARGET_GEOMETRY, "particles": DOMAIN_PARTICLES[domain],
                    "energy_range": config.energy_range, "sizes": [pool_size(config), config.n_val, config.n_test],
                    "seeds": SEEDS[domain]})


def data_file(workdir: Path, domain: str) -> Path:
    return workdir / "data" / f"{domain}.pt"


def prepare_domain(domain: str, config: Config, workdir: Path) -> dict:
    """Simulate (or read) a domain's events once and store them in the workdir, so that every worker
    process loads the same events; reused when the settings match."""
    path = data_file(workdir, domain)
    settings = domain_settings(domain, config)
    if path.is_file():
        stored = torch.load(path, weights_only=False)
        if stored["settings"] == settings:
            return stored
    start = time.perf_counter()
    if domain == "gamma_pi0":
        events = read_gamma_pi0(per_class=config.gamma_pi0_per_class)
        parts = {"all": events}
    else:
        pool_seed, val_seed, test_seed = SEEDS[domain]
        n_val, n_test = (config.n_lartpc_val, config.n_lartpc_test) if domain == "lartpc" else (config.n_val, config.n_test)
        parts = {"pool": simulate(domain, pool_size(config), pool_seed, config),
                 "val": simulate(domain, n_val, val_seed, config),
                 "test": simulate(domain, n_test, test_seed, config)}
    stored = {"settings": settings, **parts}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(stored, tmp)
    sizes = ", ".join(f"{name} {len(events)}" for name, events in parts.items())
    log(f"[data] {domain}: {sizes} events in {time.perf_counter() - start:.1f} s")
    return stored


_DOMAIN_CACHE: dict = {}


def load_domain(domain: str, workdir: Path) -> dict:
    key = (str(workdir), domain)
    if key not in _DOMAIN_CACHE:
        _DOMAIN_CACHE[key] = torch.load(data_file(workdir, domain), weights_only=False)
    return _DOMAIN_CACHE[key]


def class_labels(events: list) -> np.ndarray:
    return np.array([int(e.y) for e in events], dtype=np.int64)


def split_for(task: str, n: int, seed: int, workdir: Path) -> tuple[list, list, list, np.ndarray]:
    """(train, validation, test) events of a run, and the training indices into its pool. The
    same for every arm and the references."""
    from pcfm.api import balanced_subset

    spec = TASKS[task]
    stored = load_domain(spec.domain, workdir)
    if spec.domain == "gamma_pi0":
        events = stored["all"]
        pool_index, val_index, test_index = gamma_pi0_fold(len(events), seed)
        pool = [events[i] for i in pool_index]
        val, test = [events[i] for i in val_index], [events[i] for i in test_index]
    else:
        pool, val, test = stored["pool"], stored["val"], stored["test"]
    everything = np.arange(len(pool))
    if spec.finetune_task == "classification":
        train = balanced_subset(everything, class_labels(pool), min(n, len(pool)), seed)
    else:
        train = np.sort(np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False))
    return [pool[i] for i in train], val, test, train


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
        "min_steps": min_steps_for(job, config)})


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
