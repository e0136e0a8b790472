"""Moved to :mod:`pcfm.io` (atomic writing is not specific to data files); importable from here
until pcfm 0.3."""
from pcfm.io import atomic_path

__all__ = ["atomic_path"]
