"""Throughput of the fast LArTPC simulator on one CPU core: events/s and points per event.

    python benchmarks/simulate_lartpc.py --events 200 --target 5000 10000 --target 60000 95000

Prints the command and the machine, then one line per setting; writes the same as JSON.
Both wall-clock and process CPU time are reported (the CPU figure is the one to compare on a
shared machine).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: keep any BLAS from spreading out

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from _common import announce, write_results  # noqa: E402
from pcfm.sim.lartpc import LArTPCSimulator  # noqa: E402


def measure(n_events: int, seed: int, target) -> dict:
    simulator = LArTPCSimulator(seed=seed)
    simulator.events(3, target)  # warm-up: range tables, imports
    wall, cpu = time.perf_counter(), time.process_time()
    events = simulator.events(n_events, target)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    sizes = np.array([len(e.points) for e in events])
    semantic = np.bincount(np.concatenate([e.semantic for e in events]), minlength=5)
    return dict(
        target_points=None if target is None else list(target), events=n_events,
        events_per_s_wall=n_events / wall, events_per_s_cpu=n_events / cpu,
        points_per_s_cpu=float(sizes.sum() / cpu),
        points_mean=float(sizes.mean()), points_median=float(np.median(sizes)),
        points_p5=float(np.percentile(sizes, 5)), points_p95=float(np.percentile(sizes, 95)),
        points_min=int(sizes.min()), points_max=int(sizes.max()),
        clusters_mean=float(np.mean([len(e.clusters) for e in events])),
        semantic_share=dict(zip(("shower", "track", "michel", "delta", "low_energy"),
                                np.round(semantic / semantic.sum(), 4).tolist())),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=int, nargs=2, action="append", metavar=("LO", "HI"),
                        help="also measure target_points=(LO, HI); repeatable")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/simulate_lartpc.json)")
    args = parser.parse_args(argv)
    command, machine = announce()
    rows = []
    for target in [None] + [tuple(t) for t in (args.target or [])]:
        result = measure(args.events, args.seed, target)
        rows.append(result)
        print(f"target={target}: {result['events_per_s_cpu']:.1f} events/s (CPU), "
              f"{result['events_per_s_wall']:.1f} (wall); points mean {result['points_mean']:.0f}, "
              f"median {result['points_median']:.0f}, p5-p95 {result['points_p5']:.0f}-{result['points_p95']:.0f}")
    write_results("simulate_lartpc", command, machine, rows, args.out)


if __name__ == "__main__":
    main()
