"""The training engine: data modules, the Lightning Trainer, checkpoints and resume.

- :mod:`pcfm.engine.data`: :class:`PretrainDataModule` (files, datasets or simulated events;
  seeded split; point-budget batches sharded over DDP ranks; resumable mid-epoch);
- :mod:`pcfm.engine.training`: :func:`make_trainer`, :func:`fit` (automatic resume from
  ``workdir/checkpoints/last.ckpt``), :func:`read_history`, :func:`hold_workdir` (one run per
  workdir: :class:`pcfm.errors.WorkdirInUseError` for a second) and :func:`start_afresh`
  (``resume=False`` deletes what could be resumed).
"""
from pcfm.engine.data import PretrainDataModule, simulate_pretraining_events
from pcfm.engine.training import checkpoint_path, fit, hold_workdir, make_trainer, read_history, start_afresh

__all__ = ["PretrainDataModule", "simulate_pretraining_events", "make_trainer", "fit", "read_history",
           "checkpoint_path", "hold_workdir", "start_afresh"]
