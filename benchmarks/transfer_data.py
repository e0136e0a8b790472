"""The transfer benchmark's events: simulated pools, validation and test sets, the Geant4
gamma/pi0 folds, and each run's split (:mod:`transfer`)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import references
from _common import as_json, log
from pcfm.io import atomic_path
from transfer_config import Config, DOMAIN_PARTICLES, GAMMA_PI0_FOLDS, LARTPC_GEOMETRY, SEEDS, TARGET_GEOMETRY, TASKS

# ----------------------------------------------------------------------------- data


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
