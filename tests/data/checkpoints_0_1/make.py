"""How the stored fine-tune checkpoints of pcfm 0.1 (before the DownstreamTask registry) were made.

Run once with the code of commit 1fd51bc: ``python tests/data/checkpoints_0_1/make.py``. Each
``<task>.ckpt`` is a 4-step fine-tune of a one-block, 32-wide backbone (kept small for the
repository, optimiser state stripped); ``expected.json`` holds the outputs of the reloaded module
on the events of :func:`events`, which the current code must reproduce (tests/finetuning/test_finetune.py).
"""
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = {"preset": "tiny", "depth": 1, "width": 32, "heads": 2}


def events(task: str):
    """The fixed events the stored outputs belong to."""
    from torch_geometric.data import Batch

    from pcfm.engine.data import simulate_pretraining_events, pretraining_item

    geometry = "lartpc-768" if task == "segmentation" else "calochallenge-ds2"
    dataset = simulate_pretraining_events(geometry, 4, seed=11, lartpc_points=(200, 300) if task == "segmentation"
                                          else None, energy_range=(1e3, 5e3))
    return Batch.from_data_list([pretraining_item(dataset[i], i) for i in range(len(dataset))])


def main():
    import pcfm
    from pcfm.tasks.finetune import FinetuneModule

    expected = {}
    for task in ("classification", "regression", "segmentation"):
        workdir = HERE / "_runs" / task
        options = dict(lartpc_points=(200, 300)) if task == "segmentation" else dict(energy_range=(1e3, 5e3))
        result = pcfm.finetune(task, model=MODEL, n_events=40, max_steps=4, batch_points=3000, workdir=workdir,
                               resume=False, accelerator="cpu", progress=False, data_options=options,
                               targets=("incident_energy", "theta"))
        stored = torch.load(result.checkpoint_path, map_location="cpu", weights_only=False)
        stored.pop("optimizer_states", None)
        stored.pop("lr_schedulers", None)
        torch.save(stored, HERE / f"{task}.ckpt")
        module = FinetuneModule.load_from_checkpoint(HERE / f"{task}.ckpt").eval()
        with torch.no_grad():
            expected[task] = module(events(task)).tolist()
    (HERE / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main()
