"""A run's folder: a fresh start leaves nothing of the run before to resume, one run at a time,
and what killed runs left (temporary files, the lock) does not get in the way of the next."""
import os
import re
import socket

import lightning as L
import pytest

from pcfm.api import finetune, pretrain
from pcfm.engine.training import LOCK_FILE
from pcfm.errors import WorkdirInUseError
from pcfm.tasks.pretrain import read_checkpoint
from tests.interruption import InterruptAt, Interrupted, kill, start_python, wait_killed

# 8 simulated showers, a one-block backbone: a step takes a few hundredths of a second on a CPU.
SETTINGS = dict(n_events=8, batch_points=2000, val_fraction=0.0, progress=False, deterministic=True,
                log_every_n_steps=1, model={"preset": "tiny", "depth": 1},
                objective_options={"mpm": {"decoder_depth": 1}})


class CountSteps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps += 1


def contents(folder):
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_a_fresh_start_leaves_nothing_of_the_run_before_to_resume(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    pretrain(workdir=tmp_path, max_steps=2, seed=0, **SETTINGS)
    # resume=False, crashed after its first checkpoint: last.ckpt is the new run's, under its own name
    with pytest.raises(Interrupted):
        pretrain(workdir=tmp_path, resume=False, seed=1, max_steps=4, checkpoint_every_n_steps=2,
                 callbacks=[InterruptAt(3)], **SETTINGS)
    assert contents(checkpoints) == ["last.ckpt"]  # not last-v1.ckpt beside the old run's last.ckpt
    stored = read_checkpoint(checkpoints / "last.ckpt")
    assert stored["hyper_parameters"]["seed"] == 1 and stored["global_step"] == 2
    # resume=False, crashed before its first checkpoint: nothing to resume at all
    with pytest.raises(Interrupted):
        pretrain(workdir=tmp_path, resume=False, seed=2, max_steps=4, checkpoint_every_n_steps=2,
                 callbacks=[InterruptAt(1)], **SETTINGS)
    assert contents(checkpoints) == []
    counter = CountSteps()
    rerun = pretrain(workdir=tmp_path, seed=2, max_steps=4, checkpoint_every_n_steps=2, callbacks=[counter],
                     **SETTINGS)
    assert counter.steps == 4 and rerun.module.hparams["seed"] == 2  # trained from the start: not the old run
    assert [row["step"] for row in rerun.history if "train/loss" in row] == [0, 1, 2, 3]


KILLED_WHILE_SAVING = """
    import io, os, signal, sys
    from pathlib import Path
    import torch

    torch.set_num_threads(1)
    from pcfm.api import pretrain

    real_save, saves = torch.save, []

    def save_half_then_die(content, path, *args, **kwargs):  # the second checkpoint: killed mid-write
        saves.append(path)
        if len(saves) < 2:
            return real_save(content, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(content, buffer)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    pretrain(workdir=sys.argv[1], resume=False, seed=1, max_steps=6, checkpoint_every_n_steps=2, **{settings})
"""


def test_a_fresh_start_killed_while_saving_is_resumed_and_leaves_no_temporary_file(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    pretrain(workdir=tmp_path, max_steps=2, seed=0, **SETTINGS)
    run = start_python(KILLED_WHILE_SAVING.replace("{settings}", repr(SETTINGS)), tmp_path)
    wait_killed(run)
    last, (leftover,) = checkpoints / "last.ckpt", [path for path in checkpoints.iterdir() if path.name != "last.ckpt"]
    assert re.fullmatch(rf"\.last\.ckpt\.[A-Za-z0-9-]+\.{run.pid}\.[a-z0-9_]+\.tmp", leftover.name), leftover.name
    stored = read_checkpoint(last)  # the new run's first checkpoint, intact
    assert stored["hyper_parameters"]["seed"] == 1 and stored["global_step"] == 2
    assert (tmp_path / LOCK_FILE).exists()  # the killed run could not delete its lock file ...
    counter = CountSteps()
    pretrain(workdir=tmp_path, seed=1, max_steps=6, checkpoint_every_n_steps=2, callbacks=[counter], **SETTINGS)
    assert counter.steps == 4  # ... which does not stop the rerun, and it resumed the new run at step 2
    assert contents(checkpoints) == ["last.ckpt"] and read_checkpoint(last)["global_step"] == 6
    assert not (tmp_path / LOCK_FILE).exists()


HOLD = """
    import sys, time
    from pcfm.io import exclusive_lock

    with exclusive_lock(sys.argv[1]):  # what a run does to its workdir (hold_workdir)
        print("holding", flush=True)
        time.sleep(120)
"""


def test_a_second_run_on_a_busy_workdir_fails_at_once_and_a_killed_run_does_not_keep_it(tmp_path):
    holder = start_python(HOLD, tmp_path / LOCK_FILE)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        busy = re.escape(f"{tmp_path} is in use by another run: pid {holder.pid} on host {socket.gethostname()}, "
                         f"since ")
        with pytest.raises(WorkdirInUseError, match=busy):
            pretrain(workdir=tmp_path, max_steps=1, **SETTINGS)
        with pytest.raises(WorkdirInUseError, match=busy):
            finetune("classification", workdir=tmp_path, max_steps=1, n_events=8, progress=False)
        assert contents(tmp_path) == [LOCK_FILE]  # before any work
    finally:
        kill(holder)
    # What killed writers left beside the run's files goes when the next run holds the folder.
    leftovers = [tmp_path / "checkpoints" / ".last.ckpt.abcd1234.tmp",
                 tmp_path / "checkpoints" / f".last.ckpt.somehost.{os.getpid()}.abcd1234.tmp",
                 tmp_path / "logs" / ".versions.json.abcd1234.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    result = pretrain(workdir=tmp_path, max_steps=1, **SETTINGS)
    assert result.checkpoint_path.is_file()
    assert contents(tmp_path / "checkpoints") == ["last.ckpt"] and not any(path.exists() for path in leftovers)
    assert LOCK_FILE not in contents(tmp_path)


class TryTheWorkdir(L.Callback):
    """Starts a pretraining and a fine-tuning run on the workdir of the run it is part of."""

    def __init__(self, workdir):
        self.workdir, self.errors = workdir, []

    def on_train_start(self, trainer, module):
        for verb in (lambda: pretrain(workdir=self.workdir, max_steps=1, **SETTINGS),
                     lambda: finetune("classification", workdir=self.workdir, max_steps=1, progress=False)):
            try:
                verb()
            except WorkdirInUseError as error:
                self.errors.append(str(error))


def test_a_run_holds_its_workdir_until_it_ends_even_by_an_exception(tmp_path):
    with pytest.raises(Interrupted):
        pretrain(workdir=tmp_path, max_steps=2, callbacks=[InterruptAt(1)], **SETTINGS)
    assert LOCK_FILE not in contents(tmp_path)  # released by the exception
    trying = TryTheWorkdir(tmp_path)
    pretrain(workdir=tmp_path, max_steps=2, callbacks=[trying], **SETTINGS)
    assert len(trying.errors) == 2, trying.errors  # even from the same process
    assert all(f"is in use by another run: pid {os.getpid()} " in error for error in trying.errors)
    assert LOCK_FILE not in contents(tmp_path)
