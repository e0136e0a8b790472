"""Progress that reaches a log file: one line every few percent of a run, whatever stdout is.

A progress bar redraws one line with carriage returns; written to a file, a CI log or a pipe it
shows nothing useful until the run ends. :class:`ProgressLines` prints plain lines instead::

    pretrain: step 150/3000 (5%)  loss 1.8342  2.41 steps/s  19m42s left

:func:`progress_callback` picks the bar for a terminal and the lines otherwise. The rate counts
only the steps of this start (a resumed run does not claim the earlier steps' speed).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

#: Lines per run (one every 5 %), unless the run has fewer steps.
LINES_PER_RUN = 20


def clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLines(Callback):
    """Prints ``label: step s/total (p%)  loss L  r steps/s  t left`` every ``every`` steps
    (default: ``max_steps / 20``), at the first step and at the last, flushed at once; also
    each validation loss. Only rank 0 prints."""

    def __init__(self, label: str = "train", every: Optional[int] = None, stream: Optional[TextIO] = None):
        super().__init__()
        self.label, self.every, self.stream = label, every, stream
        self._start_time: Optional[float] = None
        self._start_step = 0

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(f"{self.label}: {text}", file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time, self._start_step = time.perf_counter(), trainer.global_step
        if self._start_step:
            self._print(trainer, f"resumed at step {self._start_step}/{trainer.max_steps}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, max(trainer.max_steps, 1)
        every = self.every or max(1, total // LINES_PER_RUN)
        if not (step == self._start_step + 1 or step % every == 0 or step == total):
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - (self._start_time or time.perf_counter())
        rate = done / elapsed if elapsed > 0 else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"  loss {float(loss):.4f}" if loss is not None else ""
        left = f"  {clock((total - step) / rate)} left" if rate == rate and rate > 0 else ""
        self._print(trainer, f"step {step}/{total} ({100 * step / total:.0f}%){loss_text}  {rate:.2f} steps/s{left}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self._print(trainer, f"step {trainer.global_step}: val/loss {float(loss):.4f}")


def progress_callback(label: str, refresh_rate: int, stream: Optional[TextIO] = None) -> Callback:
    """A tqdm bar when ``stream`` (stdout) is a terminal, else :class:`ProgressLines`."""
    stream = stream or sys.stdout
    is_terminal = getattr(stream, "isatty", lambda: False)()
    return TQDMProgressBar(refresh_rate=max(1, refresh_rate)) if is_terminal else ProgressLines(label)
