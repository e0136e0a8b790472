"""Deprecated (removed in pcfm 0.3): moved to :mod:`pcfm.api.quickstart`."""
from pcfm._moved import moved

moved(__name__, "pcfm.api.quickstart")
