"""Errors raised by pcfm.

Every problem with user data is a :class:`DataError` that names the file, the event (when one
is at fault) and the problem, so that a user with a 100 GB data set can find the bad entry.
"""
from __future__ import annotations

from os import PathLike


class PcfmError(Exception):
    """Base class of all pcfm errors."""


class DataError(PcfmError, ValueError):
    """Bad input data: a missing key, a wrong shape, a non-finite value, an empty event, ...

    Attributes:
        path: the file at fault (``None`` for in-memory data).
        event: the index of the event at fault inside that file (``None`` when the whole file is).
        problem: what is wrong, in words.
    """

    def __init__(self, problem: str, path: str | PathLike | None = None, event: int | None = None):
        self.path = None if path is None else str(path)
        self.event = event
        self.problem = problem
        where = self.path if self.path is not None else "<in-memory data>"
        if event is not None:
            where += f": event {event}"
        super().__init__(f"{where}: {problem}")


class GeometryError(PcfmError, ValueError):
    """An unknown geometry name or an inconsistent geometry definition."""


class ArgumentError(PcfmError, ValueError):
    """A bad argument value (a count below 1, an energy that is not positive and finite, ...):
    the message names the argument. A ValueError, as Python's own checks of values are."""


class WorkdirInUseError(PcfmError, RuntimeError):
    """Another run works in the workdir now (its lock is held); the message names it (pid, host,
    start time)."""
