"""Does the event conditioning make masked point modelling too easy?

The MPM decoder is conditioned on the event (incident energy and angles, through adaptive layer
norm). If the incident energy told the decoder most of what the hidden points hold, the encoder
would have little to learn. This script loads an MPM checkpoint, draws the same masks on the
same held-out showers, and compares the loss terms with the conditions given and with them
hidden (read as unknown, as ``condition_dropout`` trains the model to accept). A large rise
without the conditions means the conditions carry the reconstruction; a small one means the
visible points do.

    python benchmarks/mpm_conditioning.py CHECKPOINT [--n-events 400] [--mask-seeds 0 1 2 3 4]
        [--geometry calochallenge-ds2] [--out FILE.json]

Output: JSON (default ``benchmarks/results/mpm_conditioning.json``) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch_geometric.data import Batch

from _common import RESULTS_DIR, announce, log, markdown_table, write_results
from pcfm.data import PointBudgetBatchSampler
from pcfm.io import atomic_path
from pcfm.engine.data import pretraining_item, simulate_pretraining_events
from pcfm.nn.encoding import CONDITION_FIELDS, hide_condition
from pcfm.tasks.pretrain import PretrainModule

TERMS = ("loss", "chamfer", "scale", "point_energy", "total_energy")


def mpm_terms_on(module: PretrainModule, batches: list, seed: int, hide: bool) -> dict[str, float]:
    """MPM loss terms over ``batches`` (weighted by events) with masks drawn from ``seed``."""
    objective = module.objectives["mpm"]
    generator = torch.Generator().manual_seed(seed)
    sums, events = {name: 0.0 for name in TERMS}, 0
    with torch.no_grad():
        for batch in batches:
            seen = hide_condition(batch, tuple(f for f in CONDITION_FIELDS if getattr(batch, f, None) is not None)) \
                if hide else batch
            terms = objective.loss(module.backbone, seen, generator)
            size = int(batch.num_graphs)
            for name in TERMS:
                sums[name] += float(terms[name]) * size
            events += size
    return {name: value / events for name, value in sums.items()}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--geometry", default="calochallenge-ds2")
    parser.add_argument("--n-events", type=int, default=400)
    parser.add_argument("--mask-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--event-seed", type=int, default=77, help="simulation seed (not the pretraining's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mpm_conditioning.json")
    args = parser.parse_args(argv)
    command, machine = announce()
    module = PretrainModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    if "mpm" not in module.objectives:
        raise SystemExit(f"{args.checkpoint} has no mpm objective (it has {list(module.objectives)})")
    events = simulate_pretraining_events(args.geometry, args.n_events, particles=("electron", "photon", "pion"),
                                         energy_range=(1e3, 1e5), seed=args.event_seed)
    items = [pretraining_item(events[i], i) for i in range(len(events))]
    sizes = np.array([item.num_nodes for item in items])
    batches = [Batch.from_data_list([items[i] for i in index])
               for index in PointBudgetBatchSampler(sizes, 20_000, shuffle=False)]
    log(f"{len(items)} {args.geometry} showers in {len(batches)} batches; masks from seeds {args.mask_seeds}")
    rows = []
    for seed in args.mask_seeds:
        given, hidden = mpm_terms_on(module, batches, seed, False), mpm_terms_on(module, batches, seed, True)
        rows.append({"part": "seed", "mask_seed": seed, **{f"{k}_given": v for k, v in given.items()},
                     **{f"{k}_hidden": v for k, v in hidden.items()}})
        log(f"mask seed {seed}: loss {given['loss']:.4f} with the conditions, {hidden['loss']:.4f} without")
    summary = []
    for name in TERMS:
        difference = np.array([r[f"{name}_hidden"] - r[f"{name}_given"] for r in rows])
        given = float(np.mean([r[f"{name}_given"] for r in rows]))
        summary.append({"part": "term", "term": name, "given": given,
                        "hidden": float(np.mean([r[f"{name}_hidden"] for r in rows])),
                        "rise": float(difference.mean()), "rise_relative": float(difference.mean() / given),
                        "standard_error": float(difference.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1
                        else None})
    rows = rows + summary + [{"part": "summary", "checkpoint": str(args.checkpoint), "geometry": args.geometry,
                              "n_events": len(items), "mask_seeds": args.mask_seeds}]
    write_results("mpm_conditioning", command, machine, rows, args.out)
    text = "\n".join([
        "## Does the conditioning make MPM too easy? (`benchmarks/mpm_conditioning.py`)", "",
        f"`{command}` — {machine.get('cpu')}; {len(items)} held-out {args.geometry} showers, the same masks "
        f"(seeds {args.mask_seeds}) with the event conditions given and hidden.", "",
        markdown_table(summary, [("term", "term", ""), ("conditions given", "given", ".4f"),
                                 ("hidden", "hidden", ".4f"), ("rise", "rise", "+.4f"),
                                 ("rise / given", "rise_relative", "+.3f"), ("s.e.", "standard_error", ".4f")]), ""])
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    log(text)
    return rows


if __name__ == "__main__":
    main()
