"""The quickstart: a tour of pcfm on simulated data that runs in minutes on a laptop CPU.

Simulates showers on two calorimeter geometries and a few LArTPC events, writes them in the
real file formats, reads them back lazily as point clouds in millimetres, packs ragged batches
by a point budget, builds the per-event kNN graphs and farthest-point samples a model tokenises
with, then pretrains the tiny backbone by masked point modelling on both geometries' files and
reports the loss curve and the checkpoint. Each step prints what it did and how long it took.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from pcfm.data import PointBudgetBatchSampler, open_dataset, write_calochallenge, write_pilarnet
from pcfm.ops.cluster import fps, knn_graph
from pcfm.sim import simulate_lartpc_events, simulate_showers


class _Step:
    """Prints a numbered step and its duration: progress for the person watching."""

    def __init__(self, total: int):
        self.total, self.count = total, 0

    def __call__(self, text: str):
        self.count += 1
        print(f"[{self.count}/{self.total}] {text} ...", flush=True)
        self.start = time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"      done in {time.perf_counter() - self.start:.1f} s", flush=True)


def run_quickstart(workdir: str | Path = "pcfm_runs/quickstart", seed: int = 0, n_showers: int = 2000,
                   n_lartpc: int = 50, pretrain_steps: int = 300) -> dict:
    """Run the tour; returns a summary dictionary (also printed)."""
    from pcfm.api.pretraining import pretrain

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    step = _Step(6)
    summary: dict = {}
    files = {}
    with step(f"simulating {n_showers} electron + pion showers on calochallenge-ds2 and par04-scipb"):
        for k, geometry in enumerate(("calochallenge-ds2", "par04-scipb")):
            particles = np.where(np.arange(n_showers) % 2 == 0, 11, 211)
            showers = simulate_showers(geometry, n_showers, particle=particles, energy=(1e3, 1e5),
                                       theta=(np.radians(50), np.radians(90)), seed=seed + k)
            files[geometry] = workdir / f"{geometry}.h5"
            write_calochallenge(files[geometry], showers)
            ratio = showers.showers.sum(1) / showers.incident_energies
            print(f"      {geometry}: {files[geometry]} (E_dep/E_inc median {np.median(ratio):.2f})")
    with step(f"simulating {n_lartpc} LArTPC events (PILArNet-M v2 layout)"):
        files["lartpc"] = workdir / "lartpc.h5"
        write_pilarnet(files["lartpc"], simulate_lartpc_events(n_lartpc, seed=seed))
        print(f"      lartpc: {files['lartpc']}")
    with step("reading the files back lazily as point clouds in mm"):
        datasets = {name: open_dataset(path) for name, path in files.items()}
        for name, dataset in datasets.items():
            sizes = dataset.event_sizes()
            summary[name] = {"events": len(dataset), "points_median": float(np.median(sizes)),
                             "points_max": int(sizes.max())}
            print(f"      {name}: {len(dataset)} events, points per event median {np.median(sizes):.0f}, "
                  f"max {sizes.max()}")
    with step("packing ragged batches by a point budget of 60,000 points"):
        dataset = datasets["calochallenge-ds2"]
        sampler = PointBudgetBatchSampler(dataset.event_sizes(), max_points=60_000, seed=seed)
        loader = DataLoader(dataset, batch_sampler=sampler)
        batch = next(iter(loader))
        print(f"      {len(sampler)} batches; the first holds {batch.num_graphs} showers and "
              f"{batch.num_nodes} points (no padding); pos spans "
              f"{batch.pos.min(0).values.numpy().round(1)} .. {batch.pos.max(0).values.numpy().round(1)} mm")
        summary["batches"] = len(sampler)
    with step("kNN graph (k=16) and farthest-point centres (10%) per event of that batch"):
        edges = knn_graph(batch.pos, k=16, batch=batch.batch)
        centres = fps(batch.pos, batch.batch, ratio=0.1)
        same_event = bool(torch.all(batch.batch[edges[0]] == batch.batch[edges[1]]))
        print(f"      {edges.shape[1]} edges (all within their event: {same_event}), {centres.numel()} centres")
    with step(f"pretraining the tiny backbone by masked point modelling on both geometries ({pretrain_steps} steps)"):
        result = pretrain("mpm", [files["calochallenge-ds2"], files["par04-scipb"]], model="tiny",
                          max_steps=pretrain_steps, batch_points=8000, warmup_steps=max(1, pretrain_steps // 10),
                          workdir=workdir / "pretrain", accelerator="cpu", seed=seed,
                          log_every_n_steps=max(1, pretrain_steps // 30),
                          checkpoint_every_n_steps=max(1, pretrain_steps // 3))
        losses = [(row["step"], row["train/loss"]) for row in result.history if row.get("train/loss") is not None]
        marks = losses[:: max(1, len(losses) // 6)] + ([losses[-1]] if losses else [])
        print("      train loss by step: " + ", ".join(f"{int(s)}: {v:.3f}" for s, v in dict(marks).items()))
        if "val/loss" in result.metrics:
            print(f"      validation loss at the end: {result.metrics['val/loss']:.3f} "
                  f"(chamfer {result.metrics.get('val/mpm/chamfer', float('nan')):.3f})")
        print(f"      checkpoint: {result.checkpoint_path}")
        summary["pretrain"] = {"first_loss": losses[0][1] if losses else None,
                               "last_loss": losses[-1][1] if losses else None,
                               "checkpoint": str(result.checkpoint_path), "metrics": result.metrics}
    print(f"quickstart finished; files are in {workdir}")
    return summary
