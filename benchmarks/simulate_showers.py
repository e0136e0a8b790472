"""Throughput of the parameterised shower simulator (pcfm.sim.calo) on one CPU core.

Showers per second at batch 1000, energies log-uniform 1 GeV - 1 TeV, normal incidence (plus
one oblique row), for electrons and pions on the preset calorimeters. Each figure is the best
of a few timed runs after an untimed warm-up batch. Results go to benchmarks/results/simulate_showers.json.

    python benchmarks/simulate_showers.py [--quick]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import announce, markdown_table, write_results  # noqa: E402
from pcfm.sim.calo import ShowerSimulator  # noqa: E402
CASES = [  # geometry, particle, theta
    ("calochallenge-ds2", "electron", np.pi / 2),
    ("calochallenge-ds2", "pion", np.pi / 2),
    ("calochallenge-ds2", "electron", (0.87, 2.27)),
    ("calochallenge-ds3", "electron", np.pi / 2),
    ("calochallenge-ds3", "pion", np.pi / 2),
    ("par04-scipb", "electron", np.pi / 2),
    ("par04-scipb", "pion", np.pi / 2),
    ("calochallenge-ds1-pions", "electron", np.pi / 2),
    ("calochallenge-ds1-pions", "pion", np.pi / 2),
]


def measure(geometry: str, particle: str, theta, batch: int, repeats: int) -> dict:
    simulator = ShowerSimulator(geometry)
    simulator.simulate(batch, particle=particle, theta=theta, seed=0)  # warm-up: allocations, caches
    best, showers = np.inf, None
    for repeat in range(repeats):
        start = time.perf_counter()
        showers = simulator.simulate(batch, particle=particle, energy=(1e3, 1e6), theta=theta, seed=repeat + 1)
        best = min(best, time.perf_counter() - start)
    response = showers.showers.sum(axis=1) / showers.incident_energies
    return {
        "geometry": geometry, "particle": particle,
        "theta": "pi/2" if not isinstance(theta, tuple) else f"uniform {theta}",
        "n_cells": simulator.geometry.n_cells, "batch": batch, "repeats": repeats,
        "seconds": round(best, 4), "showers_per_s": round(batch / best, 1),
        "mean_response": round(float(response.mean()), 4),
        "nonzero_fraction": round(float((showers.showers > 0).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run per case instead of five")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command, machine = announce()
    rows = [measure(g, p, t, 1000, 1 if args.quick else 5) for g, p, t in CASES]
    for row in rows:
        row["ms_per_shower"] = 1000 * row["seconds"] / row["batch"]
    print(markdown_table(rows, [("geometry", "geometry", ""), ("cells", "n_cells", "d"), ("particle", "particle", ""),
                                ("theta", "theta", ""), ("showers/s", "showers_per_s", ".0f"),
                                ("ms/shower", "ms_per_shower", ".3f"), ("E_dep/E_inc", "mean_response", ".3f"),
                                ("nonzero cells", "nonzero_fraction", ".3f")]))
    write_results("simulate_showers", command, machine, rows)


if __name__ == "__main__":
    main()
