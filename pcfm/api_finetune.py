"""Deprecated (removed in pcfm 0.3): moved to :mod:`pcfm.api.finetuning`."""
from pcfm._moved import moved

moved(__name__, "pcfm.api.finetuning")
