"""Shared HDF5 plumbing for the file readers: opening with clear errors, lazy per-process handles,
and a base class for datasets that hold one event per entry, spread over many files.

Why lazy, per-process handles: an h5py file opened in a parent process must not be used in a
forked DataLoader worker (the HDF5 library state is not fork-safe), and h5py objects cannot be
pickled for spawned workers. :class:`LazyH5` remembers the process id that opened the file and
reopens it when it finds itself in another process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import h5py
import numpy as np
import torch

from pcfm.errors import DataError

PathLike = str | os.PathLike
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def expand_paths(paths_or_globs: PathLike | Iterable[PathLike],
                 suffixes: Sequence[str] = HDF5_SUFFIXES) -> list[Path]:
    """Turn one or several file names, glob patterns or folders into a sorted list of files.

    A folder stands for the files directly inside it whose name ends with one of ``suffixes``.
    Duplicates are removed; the result is sorted so that the global event index of a data set
    does not depend on the order the user listed its files in.

    Raises:
        FileNotFoundError: a named file does not exist, or a glob or folder matches no file.
    """
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    items = [os.path.expanduser(os.fspath(p)) for p in paths_or_globs]
    if not items:
        raise FileNotFoundError("no input files given")
    found: set[Path] = set()
    for item in items:
        if any(c in item for c in "*?["):
            matches = [m for m in glob(item, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {item!r}")
        elif os.path.isdir(item):
            matches = [e.path for e in os.scandir(item) if e.is_file() and e.name.endswith(tuple(suffixes))]
            if not matches:
                raise FileNotFoundError(f"{item}: folder holds no file ending in {', '.join(suffixes)}")
        elif os.path.exists(item):
            matches = [item]
        else:
            raise FileNotFoundError(f"{item}: no such file")
        found.update(Path(m) for m in matches)
    return sorted(found)


def open_hdf5(path: PathLike) -> h5py.File:
    """Open ``path`` read-only; a file that is not HDF5, truncated or unreadable gives a DataError.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: anything else that stops the file from opening, naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise DataError("is a folder, not an HDF5 file", path)
    try:
        if not h5py.is_hdf5(path):
            raise DataError("not an HDF5 file (no HDF5 signature found)", path)
        return h5py.File(path, "r")
    except OSError as exc:
        if "truncated" in str(exc):
            raise DataError(f"truncated HDF5 file, probably an incomplete copy ({exc})", path) from exc
        raise DataError(f"cannot open as HDF5, the file may be corrupt ({exc})", path) from exc


def require_keys(h5file: h5py.File | h5py.Group, keys: Iterable[str], path: PathLike) -> None:
    """Raise a DataError naming ``path``, the missing keys and the keys found, if any is absent."""
    missing = [k for k in keys if k not in h5file]
    if missing:
        found = ", ".join(repr(k) for k in h5file.keys()) or "none"
        raise DataError(
            f"missing dataset(s) {', '.join(repr(k) for k in missing)}; keys found: {found}", path
        )


def _n_entries(h5file: h5py.File, key: str, path: PathLike) -> int:
    """Length of the first axis of dataset ``key`` (the number of events it holds)."""
    node = h5file[key]
    if not isinstance(node, h5py.Dataset) or not node.shape:
        raise DataError(f"{key!r} must be a dataset with one entry per event, found {node}", path)
    return int(node.shape[0])


@contextlib.contextmanager
def read_errors(path: PathLike, event: int | None = None) -> Iterator[None]:
    """Turn low-level h5py read failures (corrupt chunks, I/O errors) into a DataError."""
    try:
        yield
    except DataError:
        raise
    except (OSError, RuntimeError) as exc:
        raise DataError(f"cannot read from the file ({exc})", path, event) from exc


class LazyH5:
    """A read-only HDF5 file that each process opens on first use.

    ``lazy.file`` (or ``lazy["key"]`` for a dataset) opens the file if this process has not
    opened it yet. A handle inherited from a parent process over ``fork`` is detected by its
    process id and replaced, and pickling drops the handle, so datasets holding ``LazyH5``
    objects work with DataLoader workers started by fork or spawn.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    @property
    def is_open(self) -> bool:
        """Whether this process holds an open handle."""
        return self._file is not None and self._pid == os.getpid()

    @property
    def file(self) -> h5py.File:
        if not self.is_open:
            if self._file is not None:  # inherited from the parent: release this process's copy
                with contextlib.suppress(Exception):
                    self._file.close()
            self._datasets = {}
            self._file = open_hdf5(self.path)
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, key: str) -> h5py.Dataset:
        file = self.file
        if key not in self._datasets:
            self._datasets[key] = file[key]
        return self._datasets[key]

    def close(self) -> None:
        if self.is_open:
            self._file.close()
        self._file, self._pid, self._datasets = None, None, {}

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"LazyH5({str(self.path)!r}, open={self.is_open})"


@dataclass
class ScanReport:
    """What :meth:`LazyEventDataset.scan` found: every bad event, as the DataError it raised."""

    n_checked: int
    problems: list[DataError] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.problems)

    def __str__(self) -> str:
        lines = [f"checked {self.n_checked} events, skipped {self.n_skipped}"]
        lines += [f"  {err}" for err in self.problems]
        return "\n".join(lines)


class LazyEventDataset(torch.utils.data.Dataset):
    """Base for torch datasets over HDF5 files that hold one event per entry of their datasets.

    Construction reads only file metadata (dataset shapes and types) to learn the number of
    events; event data is read one event per ``__getitem__``, through per-process lazy handles.
    Item ``i`` runs over the events of all files, in the sorted file order of
    :func:`expand_paths`, minus the events dropped by ``min_points`` or :meth:`scan`.

    Bad events (``on_error``):
        * ``"raise"``: ``dataset[i]`` raises the :class:`DataError` naming the file and event.
        * ``"skip"``: ``dataset[i]`` on a bad event returns the next good event (``i+1``,
          ``i+2``, ..., wrapping round), so the length stays fixed and a DataLoader never fails;
          the problem is recorded in :attr:`skipped` of the process that met it (each DataLoader
          worker keeps its own). Call :meth:`scan` first to validate every event up front, drop
          the bad ones from the index and get a complete report.

    Files without events are allowed among others; a set of files that holds no event at all
    raises a DataError naming the (first) file at construction.

    Subclasses set :attr:`keys` and implement :meth:`_inspect`, :meth:`_read` and
    :meth:`_count_points`.
    """

    #: datasets every file must contain, all with one entry per event along the first axis.
    keys: tuple[str, ...] = ()

    def __init__(self, paths_or_globs: PathLike | Iterable[PathLike], *,
                 transform: Callable[[Any], Any] | None = None, min_points: int = 0,
                 on_error: str = "raise", size_chunk: int = 4096):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = expand_paths(paths_or_globs)
        self.transform = transform
        self.min_points = int(min_points)
        self.on_error = on_error
        self.size_chunk = int(size_chunk)
        lengths = []
        self.file_info: list[Any] = []
        for path in self.paths:
            with open_hdf5(path) as h5file, read_errors(path):
                require_keys(h5file, self.keys, path)
                n_events = {k: _n_entries(h5file, k, path) for k in self.keys}
                if len(set(n_events.values())) != 1:
                    raise DataError(f"datasets disagree on the number of events: {n_events}", path)
                lengths.append(n_events[self.keys[0]])
                self.file_info.append(self._inspect(h5file, path))
        if sum(lengths) == 0:  # else training fails later, naming no file
            others = f", nor do the other {len(self.paths) - 1} file(s) given" if len(self.paths) > 1 else ""
            raise DataError(f"holds no events{others}: an empty or unfinished file?", self.paths[0])
        self._handles = [LazyH5(p) for p in self.paths]
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._items = np.arange(self._offsets[-1], dtype=np.int64)  # raw global id of each item
        self._raw_sizes: np.ndarray | None = None
        self._bad: dict[int, DataError] = {}  # raw global id -> problem, met by this process
        if self.min_points > 0:
            self._items = self._items[self._all_sizes() >= self.min_points]

    # --- to implement -------------------------------------------------------------------------
    def _inspect(self, h5file: h5py.File, path: Path) -> Any:
        """Check the layout of one file at construction (raise DataError); return per-file info."""
        return None

    def _read(self, h5: LazyH5, index: int, info: Any) -> Any:
        """Read and validate event ``index`` of the file behind ``h5``; raise DataError if bad."""
        raise NotImplementedError

    def _count_points(self, h5file: h5py.File, start: int, stop: int, info: Any) -> np.ndarray:
        """Points of events ``start:stop`` read cheaply (0 where the entry is malformed)."""
        raise NotImplementedError

    # --- indexing -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._items.shape[0])

    def locate(self, i: int) -> tuple[Path, int]:
        """The file and the event index inside it of item ``i``."""
        file_id, local = self._locate_raw(int(self._items[self._check_index(i)]))
        return self.paths[file_id], local

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} events")
        return i % n

    def _locate_raw(self, raw: int) -> tuple[int, int]:
        file_id = int(np.searchsorted(self._offsets, raw, side="right")) - 1
        return file_id, raw - int(self._offsets[file_id])

    def _load_raw(self, raw: int) -> Any:
        file_id, local = self._locate_raw(raw)
        with read_errors(self.paths[file_id], local):
            return self._read(self._handles[file_id], local, self.file_info[file_id])

    def __getitem__(self, i: int) -> Any:
        i = self._check_index(i)
        if self.on_error == "raise":
            event = self._load_raw(int(self._items[i]))
        else:
            event = self._next_good(i)
        return event if self.transform is None else self.transform(event)

    def _next_good(self, i: int) -> Any:
        for step in range(len(self)):
            raw = int(self._items[(i + step) % len(self)])
            if raw in self._bad:
                continue
            try:
                return self._load_raw(raw)
            except DataError as err:
                self._bad[raw] = err
        raise DataError(f"every one of the {len(self)} events is bad; first: {next(iter(self._bad.values()))}")

    @property
    def skipped(self) -> list[DataError]:
        """Bad events this process has met and skipped so far, as DataErrors."""
        return list(self._bad.values())

    # --- sizes and validation -----------------------------------------------------------------
    def _all_sizes(self) -> np.ndarray:
        """Points per event for every event of every file, read in chunks and cached."""
        if self._raw_sizes is None:
            parts = []
            for path, info, start, stop in zip(self.paths, self.file_info, self._offsets[:-1], self._offsets[1:]):
                with open_hdf5(path) as h5file, read_errors(path):
                    n = int(stop - start)
                    parts += [self._count_points(h5file, a, min(a + self.size_chunk, n), info)
                              for a in range(0, n, self.size_chunk)]
            self._raw_sizes = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return self._raw_sizes

    def event_sizes(self) -> np.ndarray:
        """Number of points of each item (before ``transform``), e.g. for a point-budget sampler.

        Computed on first call from a cheap pass over the files and cached; a malformed entry
        counts 0 points.
        """
        return self._all_sizes()[self._items]

    def scan(self) -> ScanReport:
        """Read and validate every event, drop the bad ones from the index, report them.

        This reads the whole data set once. Afterwards ``len``, ``event_sizes`` and the item
        numbering cover the good events only, whatever ``on_error`` is.
        """
        good = np.ones(len(self), dtype=bool)
        problems = []
        for i, raw in enumerate(self._items.tolist()):
            try:
                self._load_raw(raw)
            except DataError as err:
                good[i] = False
                problems.append(err)
                self._bad[raw] = err
        report = ScanReport(len(self), problems)
        self._items = self._items[good]
        return report

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next access)."""
        for handle in self._handles:
            handle.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.paths)} file(s), {len(self)} events, "
                f"on_error={self.on_error!r})")
