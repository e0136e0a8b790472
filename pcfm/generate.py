"""Deprecated (removed in pcfm 0.3): moved to :mod:`pcfm.api.generation`."""
from pcfm._moved import moved

moved(__name__, "pcfm.api.generation", verb="generate")
