"""pcfm checkpoint files: the marker pcfm writes into them, and a reader that checks it.

Every module of pcfm (:class:`~pcfm.engine.module.PcfmModule`) writes ``{"version", "kind"}``
under :data:`CHECKPOINT_MARKER`; :func:`read_checkpoint` refuses a file without it, or a
truncated or corrupt one, with a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pcfm.errors import PcfmError

#: Key of the marker pcfm writes into its checkpoints.
CHECKPOINT_MARKER = "pcfm"


class CheckpointError(PcfmError):
    """A checkpoint file that cannot be read, or is not a pcfm pretraining checkpoint."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The content of a pcfm checkpoint file, checked.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, not a file (the message names the run's ``last.ckpt`` when
            the folder is a workdir); the file is truncated, corrupt, not a torch checkpoint, or
            not one written by pcfm pretraining (no pcfm marker, hyperparameters or weights).
    """
    path = Path(path)
    if path.is_dir():
        inside = next((candidate for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt")
                       if candidate.is_file()), None)
        hint = f"; give the checkpoint file inside it, e.g. {inside}" if inside is not None else ""
        raise CheckpointError(path, f"is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        # Not weights_only: Lightning stores its loop and callback states as Python objects.
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
        raise CheckpointError(path, f"not a readable checkpoint (corrupt or truncated file?): "
                                    f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"not a pcfm checkpoint: holds a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in (CHECKPOINT_MARKER, "hyper_parameters", "state_dict") if key not in checkpoint]
    if missing:
        raise CheckpointError(path, f"not a pcfm pretraining checkpoint: no {', '.join(missing)} entry")
    return checkpoint
