"""A simulated crash in the middle of a Lightning run, for the resume tests."""
import lightning as L


class Interrupted(Exception):
    """Raised by :class:`InterruptAt` in place of a real crash."""


class InterruptAt(L.Callback):
    """Stops a run (as a crash would) when the trainer is about to run step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted
