"""Atomic file writing: write to a temporary file in the target folder, then rename; and a lock
file that keeps a folder to one writer at a time.

A crash or an exception while writing never leaves a half-written file under the final name,
and never destroys an existing file of that name. A crash that kills the process outright
(SIGKILL, power loss) can leave the hidden temporary file ``.<name>.<host>.<pid>.<random>.tmp``
beside the target: the next write to the same target removes those whose writer (host and pid
in the name) is no longer alive, and never the file of a writer still at work.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not on Windows: folders are not locked there
    fcntl = None

from pcfm.errors import PcfmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    """This host's name as it appears in temporary file names (no dots: the name is parsed)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` lives on this host (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def _temporary_name(target: str) -> re.Pattern:
    """Names :func:`atomic_path` gives the temporary files of ``target``: host, pid and mkstemp's
    random letters (host and pid optional: earlier versions wrote neither)."""
    return re.compile(rf"\.{re.escape(target)}\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[a-z0-9_]+\.tmp")


def leftover_temporaries(path: str | os.PathLike, any_writer: bool = False) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside ``path`` when a writer was killed: those
    whose writer process no longer lives on this host. ``any_writer``: all temporary files of
    ``path`` (and those of earlier versions, whose names say no writer), for a caller that knows
    no one else writes it now (it holds the folder's lock)."""
    final = Path(path)
    pattern, host = _temporary_name(final.name), _host()
    try:
        entries = list(os.scandir(final.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        dead = match["pid"] is not None and match["host"] == host and not pid_alive(int(match["pid"]))
        if any_writer or dead:
            found.append(final.parent / entry.name)
    return sorted(found)


def remove_leftover_temporaries(path: str | os.PathLike, any_writer: bool = False) -> list[Path]:
    """Delete :func:`leftover_temporaries` of ``path``; returns those deleted."""
    removed = []
    for leftover in leftover_temporaries(path, any_writer):
        with contextlib.suppress(FileNotFoundError):  # another cleaner was first
            leftover.unlink()
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On an exception the temporary file is removed and the exception propagates. Temporary files
    of ``path`` left by killed writers are removed first (:func:`leftover_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a leftover that cannot be removed must not stop the write
        remove_leftover_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600): give it the mode a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as stream:  # on disk before it takes the final name
            os.fsync(stream.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


class LockHeld(PcfmError):
    """The lock file is held by another process; ``holder`` is what it wrote there (``pid``,
    ``host``, ``started``; empty while it is still starting)."""

    def __init__(self, path, holder: dict):
        self.path, self.holder = str(path), dict(holder)
        super().__init__(f"{path}: held by {describe_holder(self.holder)}")


def describe_holder(holder: dict) -> str:
    """``pid 123 on host h, since 2024-05-01 12:00:00``, in words."""
    if not holder.get("pid"):
        return "a process that is starting (it has not written its pid yet)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock file ``path`` (created if needed) while the block runs, else raise
    :class:`LockHeld` at once, naming the holder.

    The lock is an ``flock`` on the open file: the system releases it when its process ends, so
    a killed holder never leaves it stuck (the file stays, unlocked, until the next holder).
    The file holds the holder's pid, host and start time for the message. On a file system
    without locks it warns and does not lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    if fd is None:
        yield path
        return
    try:
        started = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):  # before unlocking: see _lock
            path.unlink()
        os.close(fd)


def _lock(path: Path) -> Optional[int]:
    """An open descriptor of ``path`` holding its lock (None: no locking here), or LockHeld."""
    if fcntl is None:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{path}: this file system cannot lock files ({error.strerror}); nothing keeps a second "
                          f"process from using the folder at the same time", stacklevel=4)
            return None
        # The previous holder deletes the file when it is done: a lock on a file that is no
        # longer (or no more the one) at ``path`` locks nothing, so open it again.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _read_holder(fd: int) -> dict:
    """What the lock's holder wrote in the file (empty when it has not written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
