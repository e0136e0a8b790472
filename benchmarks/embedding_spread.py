"""Has a classifier's backbone collapsed? How much its event embeddings differ between events.

A fine-tuned classifier stuck at chance (loss ln 2) either never found the signal or lost its
input: when the pooled event embeddings of different events become (nearly) the same vector, the
head cannot separate anything whatever it learns. This script measures, on the gamma_pi0
validation showers of a fold of ``benchmarks/transfer.py``, the spread of the pooled embedding
across events relative to its size, and the spread of the two-class logit difference, for the
fine-tuned checkpoints given and for freshly initialised backbones (the starting point).

    python benchmarks/embedding_spread.py CHECKPOINT [CHECKPOINT ...] --fold F
        [--workdir pcfm_runs/transfer_cpu] [--n-events 100] [--init-seeds 0 1 2] [--out FILE.json]

Output: JSON (default ``benchmarks/results/embedding_spread.json``) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch

from _common import announce, log, markdown_table, write_results
from pcfm.api import LabelledView, backbone_config
from pcfm.io import atomic_path
from pcfm.finetuning import FinetuneModule


def spread(module: FinetuneModule, batch) -> dict:
    """Mean over channels of the pooled embedding's standard deviation across events, divided by
    its mean absolute value; and the standard deviation of the logit difference (class 1 - 0)."""
    module = module.eval()
    with torch.no_grad():
        pooled = module.backbone(batch, points=False).pooled.float()
        logits = module(batch).float()
    return {"pooled_relative_spread": float(pooled.std(0).mean() / pooled.abs().mean().clamp(min=1e-12)),
            "logit_difference_std": float((logits[:, 1] - logits[:, 0]).std())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="fine-tuned gamma_pi0 checkpoints")
    parser.add_argument("--fold", type=int, required=True, help="the fold whose validation showers are read")
    parser.add_argument("--workdir", type=Path, default=Path("pcfm_runs/transfer_cpu"))
    parser.add_argument("--n-events", type=int, default=100)
    parser.add_argument("--init-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    command, machine = announce()
    torch.set_num_threads(1)
    from transfer_data import split_for  # the transfer benchmark's own folds

    _, val, _, _ = split_for("gamma_pi0", 600, args.fold, args.workdir)
    view = LabelledView(val, np.arange(min(args.n_events, len(val))), "y")
    batch = Batch.from_data_list([view[i] for i in range(len(view))])
    rows = []
    for path in args.checkpoints:
        row = {"model": str(path), **spread(FinetuneModule.load_from_checkpoint(path), batch)}
        log(f"{path}: {row}")
        rows.append(row)
    for seed in args.init_seeds:
        torch.manual_seed(seed)
        module = FinetuneModule(backbone_config("tiny"), task="classification", class_names=("photon", "pi0"))
        row = {"model": f"initialised, seed {seed}", **spread(module, batch)}
        log(f"{row}")
        rows.append(row)
    for row in rows:
        row.update(fold=args.fold, n_events=len(view))
    path = write_results("embedding_spread", command, machine, rows, args.out)
    table = markdown_table(rows, [("model", "model", "s"), ("pooled spread / size", "pooled_relative_spread", ".4f"),
                                  ("logit difference s.d.", "logit_difference_std", ".4g")])
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(f"`{command}` ({machine.get('cpu')}), fold {args.fold}, {len(view)} validation showers\n\n"
                       + table + "\n")


if __name__ == "__main__":
    main()
