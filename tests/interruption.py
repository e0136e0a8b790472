"""Crashes in the middle of a run, for the resume and clean-up tests: a simulated one (an
exception, in this process) and real ones (SIGKILL of a child process: no handler, no
``finally``, no ``atexit`` runs)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Raised by :class:`InterruptAt` in place of a real crash."""


class InterruptAt(L.Callback):
    """Stops a run (as a crash would) when the trainer is about to run step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted


def start_python(code: str, *args) -> subprocess.Popen:
    """``code`` in a fresh interpreter (``sys.argv[1:]`` = ``args``), run from the project root
    so that it can import ``tests``; its stdout is a pipe, read it to wait for what it prints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_killed(process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for ``process`` to die of SIGKILL (it kills itself, or was killed); fail with its
    output when it ended otherwise."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the child did not end in {timeout} s:\n{out}\n{err}") from None
    assert process.returncode == -signal.SIGKILL, f"exit status {process.returncode}:\n{out}\n{err}"


def kill(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and reap it (a zombie's pid counts as alive)."""
    process.send_signal(signal.SIGKILL)
    wait_killed(process, timeout=60)
