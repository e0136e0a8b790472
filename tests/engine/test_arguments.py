"""Numeric arguments of pcfm.pretrain and pcfm.finetune out of their range fail before any work,
with a ValueError naming the argument and the value."""
import math
import re

import lightning as L
import pytest

from pcfm.api import finetune, pretrain
from pcfm.errors import PcfmError


class NoTraining(L.Callback):
    """A bad argument must stop the run before the trainer starts (max_steps=-1 would not end)."""

    def on_fit_start(self, trainer, module):
        raise AssertionError("training started")


# Small runs, in case an argument is let through.
PRETRAIN = dict(n_events=8, batch_points=2000, val_fraction=0.0, progress=False, max_steps=10,
                model={"preset": "tiny", "depth": 1})
FINETUNE = dict(PRETRAIN, val_fraction=0.25, data_options={"particles": ("electron", "pion")})

BOTH = [("max_steps", -1), ("max_steps", 0), ("max_steps", 2.5), ("max_steps", "100"), ("max_steps", True),
        ("batch_points", 0), ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf),
        ("warmup_steps", -1), ("weight_decay", -0.1), ("val_fraction", 1.0), ("val_fraction", -0.1),
        ("val_fraction", math.nan), ("n_events", 0), ("num_workers", -1), ("seed", -1), ("log_every_n_steps", 0),
        ("checkpoint_every_n_steps", 0), ("val_every_n_steps", 0)]
PRETRAIN_ONLY = [("mask_ratio", 0.0), ("mask_ratio", 1.0), ("gradient_clip_val", -1.0),
                 ("gradient_clip_val", math.nan)]
FINETUNE_ONLY = [("n_labels", 0), ("test_fraction", 1.0), ("test_fraction", -0.5), ("backbone_lr_scale", -1.0),
                 ("backbone_lr_scale", math.inf), ("patience", 0), ("min_steps", -1), ("min_steps", 11),
                 ("head_norm", "group")]


def check_refused(verb, name, value, workdir):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must be .*, got {re.escape(repr(value))}$") as error:
        verb(workdir=workdir, callbacks=[NoTraining()], **{name: value})
    assert isinstance(error.value, PcfmError)  # the command line shows it in one line
    assert not workdir.exists()  # before any work


@pytest.mark.parametrize("name, value", BOTH + PRETRAIN_ONLY)
def test_pretrain_refuses_arguments_out_of_range(name, value, tmp_path):
    check_refused(lambda **kw: pretrain(**{**PRETRAIN, **kw}), name, value, tmp_path / "run")


@pytest.mark.parametrize("name, value", BOTH + FINETUNE_ONLY)
def test_finetune_refuses_arguments_out_of_range(name, value, tmp_path):
    check_refused(lambda **kw: finetune("classification", **{**FINETUNE, **kw}), name, value, tmp_path / "run")


@pytest.mark.parametrize("verb, name, value, message", [
    (pretrain, "max_steps", -1, r"max_steps must be an integer >= 1, got -1"),
    (pretrain, "lr", math.nan, r"lr must be a number > 0 and finite, got nan"),
    (finetune, "val_fraction", 1, r"val_fraction must be a number in \[0, 1\), got 1"),
    (finetune, "min_steps", 11, r"min_steps must be between 0 and max_steps=10, got 11"),
    (finetune, "patience", 0, r"patience must be an integer >= 1 \(or None\), got 0")])
def test_the_messages_say_the_range(verb, name, value, message, tmp_path):
    settings = FINETUNE if verb is finetune else PRETRAIN
    run = (lambda **kw: verb("classification", **kw)) if verb is finetune else verb
    with pytest.raises(ValueError, match=f"^{message}$"):
        run(workdir=tmp_path, callbacks=[NoTraining()], **{**settings, name: value})
