"""Shared HDF5 helpers: path expansion, opening errors, missing keys, pid-aware lazy handles."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcfm.data.hdf5 import LazyH5, expand_paths, open_hdf5, read_errors, require_keys
from pcfm.errors import DataError

from tests.conftest import SHARED_DATA  # noqa: E402  ../shared/data beside the project root
REAL_FILE = SHARED_DATA / "caloclouds3_mini_sample.hdf5"


def small_file(path: Path, n: int = 4) -> Path:
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
        f["y"] = np.arange(n)
    return path


# --- expand_paths --------------------------------------------------------------------------------

def test_expand_paths_sorts_deduplicates_and_expands_folders(tmp_path):
    for name in ("c.h5", "a.h5", "b.hdf5", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.h5").write_bytes(b"")
    a, b, c = tmp_path / "a.h5", tmp_path / "b.hdf5", tmp_path / "c.h5"
    assert expand_paths(str(tmp_path / "*.h5")) == [a, c]
    assert expand_paths(tmp_path) == [a, b, c]  # folder: its HDF5 files, not recursing
    assert expand_paths([c, str(tmp_path / "?.h*"), a]) == [a, b, c]
    assert expand_paths(str(tmp_path / "**" / "*.h5")) == [a, c, tmp_path / "sub" / "d.h5"]


def test_expand_paths_errors_name_what_matched_nothing(tmp_path):
    pattern = str(tmp_path / "*.h5")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no file matches the pattern {pattern!r}")):
        expand_paths(pattern)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'gone.h5'}: no such file")):
        expand_paths([tmp_path / "gone.h5"])
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: folder holds no file ending in .h5")):
        expand_paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="no input files given"):
        expand_paths([])


# --- open_hdf5 and require_keys ------------------------------------------------------------------

def test_open_hdf5_garbage_missing_and_folder(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00not hdf5 at all" * 100)
    with pytest.raises(DataError, match=re.escape(f"{garbage}: not an HDF5 file (no HDF5 signature found)")) as info:
        open_hdf5(garbage)
    assert info.value.path == str(garbage) and info.value.event is None
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'none.h5'}: no such file")):
        open_hdf5(tmp_path / "none.h5")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: is a folder, not an HDF5 file")):
        open_hdf5(tmp_path)


def test_open_hdf5_truncated_copy_of_a_real_file(tmp_path):
    if not REAL_FILE.exists():
        pytest.skip(f"real-data fixture not found at {REAL_FILE} (shared/data is absent)")
    cut = tmp_path / "half.hdf5"
    data = REAL_FILE.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"{cut}: truncated HDF5 file")):
        open_hdf5(cut)


def test_open_hdf5_reads_a_good_file(tmp_path):
    with open_hdf5(small_file(tmp_path / "ok.h5")) as f:
        np.testing.assert_array_equal(f["y"][:], np.arange(4))


def test_require_keys_lists_missing_and_found(tmp_path):
    path = small_file(tmp_path / "keys.h5")
    with h5py.File(path, "r") as f:
        require_keys(f, ["x", "y"], path)
        with pytest.raises(DataError, match=re.escape(f"{path}: missing dataset(s) 'z', 'w'; keys found: 'x', 'y'")):
            require_keys(f, ["x", "z", "w"], path)


def test_read_errors_turns_io_failures_into_data_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape("f.h5: event 3: cannot read from the file (disk gone)")):
        with read_errors("f.h5", 3):
            raise OSError("disk gone")
    with pytest.raises(DataError, match="^f.h5: already a data error$"):
        with read_errors("f.h5", 3):
            raise DataError("already a data error", "f.h5")


# --- LazyH5 --------------------------------------------------------------------------------------

def test_lazy_handle_opens_on_first_use_and_pickles_without_it(tmp_path):
    lazy = LazyH5(small_file(tmp_path / "lazy.h5"))
    assert not lazy.is_open
    np.testing.assert_array_equal(lazy["x"][2], [6, 7, 8])
    assert lazy.is_open and lazy["x"] is lazy["x"]  # dataset objects are cached
    clone = pickle.loads(pickle.dumps(lazy))
    assert clone.path == lazy.path and not clone.is_open
    np.testing.assert_array_equal(clone["y"][:], np.arange(4))
    lazy.close()
    assert not lazy.is_open
    assert int(lazy["y"][3]) == 3  # reopens after close


def _child_reads(lazy: LazyH5, parent_file_id: int, queue) -> None:
    was_open = lazy.is_open
    values = lazy["x"][1].tolist()
    queue.put((was_open, lazy._pid == os.getpid(), lazy.file.id.id != parent_file_id, values))


def test_lazy_handle_reopens_in_a_forked_child(tmp_path):
    lazy = LazyH5(small_file(tmp_path / "fork.h5"))
    parent_file = lazy.file
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(lazy, parent_file.id.id, queue))
    child.start()
    result = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert result == (False, True, True, [3.0, 4.0, 5.0])  # not reused: reopened by the child
    assert lazy.file is parent_file and parent_file.id.valid  # the parent's handle still works
    np.testing.assert_array_equal(lazy["x"][3], [9, 10, 11])


def test_lazy_handle_on_a_file_that_became_bad(tmp_path):
    path = small_file(tmp_path / "swap.h5")
    lazy = LazyH5(path)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=re.escape(f"{path}: not an HDF5 file")):
        lazy.file


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from pcfm.io import atomic_path

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
