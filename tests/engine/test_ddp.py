"""Two-process DDP pretraining on CPU (gloo): ranks see disjoint events covering the data and end
with identical weights."""
from pathlib import Path

import lightning as L
import torch

from pcfm.api import pretrain
from pcfm.engine.data import PretrainDataModule

SETTINGS = dict(n_events=20, batch_points=1500, val_fraction=0.0, seed=3, geometry="calochallenge-ds2")


class RecordRank(L.Callback):
    """In each process: the dataset events of every training batch, and the final weights."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.events = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.events.append((trainer.current_epoch, batch.event_id.tolist()))

    def on_train_end(self, trainer, module):
        torch.save({"events": self.events, "world_size": trainer.world_size,
                    "state": {key: value.cpu() for key, value in module.state_dict().items()}},
                   self.folder / f"rank{trainer.global_rank}.pt")


def test_two_ranks_see_disjoint_events_and_end_with_the_same_weights(tmp_path):
    reference = PretrainDataModule(**SETTINGS)
    reference.setup()
    train_events = set(reference.train_dataset.indices.tolist())
    sampler = reference.train_dataloader().batch_sampler
    sampler.num_replicas, sampler.rank = 2, 0
    steps_per_epoch = len(sampler)  # epoch 0 on rank 0 (both ranks get as many batches)

    result = pretrain(workdir=tmp_path / "run", max_steps=steps_per_epoch + 1, accelerator="cpu", devices=2,
                      strategy="ddp_spawn", callbacks=[RecordRank(tmp_path)], progress=False,
                      model={"preset": "tiny", "depth": 1},
                      objective_options={"mpm": {"decoder_depth": 1}}, **SETTINGS)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    first_epoch = [[event for epoch, batch in r["events"] if epoch == 0 for event in batch] for r in ranks]
    assert all(len(events) == len(set(events)) for events in first_epoch)  # no repeat within a rank
    assert not set(first_epoch[0]) & set(first_epoch[1])  # disjoint across ranks
    assert set(first_epoch[0]) | set(first_epoch[1]) == train_events  # together: all training events
    assert any(epoch == 1 for r in ranks for epoch, _ in r["events"])  # and the next epoch started

    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    main = result.module.state_dict()
    assert all(torch.equal(a[key], main[key].cpu()) for key in a)  # the caller gets the trained weights
    assert result.checkpoint_path.is_file()
