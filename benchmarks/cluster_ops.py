"""kNN graph and farthest-point sampling on ragged batches: pcfm's torch path vs torch-cluster.

Batches: "showers" (256 events of 100-1500 points) and "lartpc" (32 events of 2000-12000
points), random positions in a 1 m box; kNN with k = 16, FPS keeping 10% of each event. Median
of a few runs after a warm-up. On a GPU only the torch path runs (no torch-cluster there).

    python benchmarks/cluster_ops.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import announce, markdown_table, write_results
from pcfm.ops.cluster import fps, knn_graph, torch_cluster_available

BATCHES = {"showers": (256, 100, 1500), "lartpc": (32, 2000, 12000)}


def ragged_batch(name: str, device: torch.device, seed: int = 0):
    n_events, lo, hi = BATCHES[name]
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (n_events,), generator=generator)
    pos = torch.rand(int(sizes.sum()), 3, generator=generator) * 1000.0
    batch = torch.arange(n_events).repeat_interleave(sizes)
    return pos.to(device), batch.to(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command, machine = announce()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch"]
    if device.type == "cpu" and torch_cluster_available():
        backends.append("torch_cluster")
    rows = []
    for name in BATCHES:
        pos, batch = ragged_batch(name, device)
        for backend in backends:
            row = {"batch": name, "points": pos.shape[0], "device": device.type, "backend": backend}
            row["knn16_ms"] = 1000 * timed(lambda: knn_graph(pos, 16, batch, backend=backend), args.repeats, device)
            row["fps10_ms"] = 1000 * timed(lambda: fps(pos, batch, ratio=0.1, backend=backend), args.repeats, device)
            rows.append(row)
            print(f"{name} {backend}: knn {row['knn16_ms']:.1f} ms, fps {row['fps10_ms']:.1f} ms", flush=True)
    print(markdown_table(rows, [("batch", "batch", ""), ("points", "points", "d"), ("device", "device", ""),
                                ("backend", "backend", ""), ("kNN k=16 (ms)", "knn16_ms", ".1f"),
                                ("FPS 10% (ms)", "fps10_ms", ".1f")]))
    write_results("cluster_ops", command, machine, rows)


if __name__ == "__main__":
    main()
