"""Deprecated (removed in pcfm 0.3): moved to :mod:`pcfm.api.evaluation`."""
from pcfm._moved import moved

moved(__name__, "pcfm.api.evaluation", verb="evaluate")
