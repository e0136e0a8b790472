"""The transfer benchmark's tasks, sizes and step budgets (:mod:`transfer`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


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
    # 3e-4 joined the grid after development runs (benchmarks/RESULTS.md): from scratch on
    # gamma_pi0, rates of 1e-3 and more collapsed the pooled embedding in the first steps.
    lr_grid: list = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
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


def gamma_pi0_pool_size(config: Config) -> int:
    """Showers a gamma_pi0 fold draws its labels from: three of the five blocks."""
    total = 2 * (config.gamma_pi0_per_class or 500)
    return total - len(np.array_split(np.arange(total), GAMMA_PI0_FOLDS)[0]) * 2
