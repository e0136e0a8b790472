"""pcfm.io: what a writer killed mid-write leaves, and what the next write removes; the folder lock."""
import os
import re
import socket

import pytest

from pcfm.io import LockHeld, atomic_path, exclusive_lock, leftover_temporaries
from tests.interruption import kill, start_python, wait_killed

WRITE_AND_DIE = """
    import os, signal, sys
    from pcfm.io import atomic_path

    with atomic_path(sys.argv[1]) as temporary:
        temporary.write_bytes(b"half of the data")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_write_killed_midway_leaves_a_temporary_that_the_next_write_to_the_target_removes(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    writer = start_python(WRITE_AND_DIE, target)
    wait_killed(writer)
    assert target.read_bytes() == b"old"  # the kill destroyed nothing
    (killed,) = [path for path in tmp_path.iterdir() if path != target]
    match = re.fullmatch(r"\.out\.h5\.([A-Za-z0-9-]+)\.(\d+)\.[a-z0-9_]+\.tmp", killed.name)
    assert match and int(match[2]) == writer.pid, killed.name  # the name says which process wrote it
    assert leftover_temporaries(target) == [killed]

    host = match[1]
    live = tmp_path / f".out.h5.{host}.{os.getpid()}.abcd1234.tmp"  # a writer still at work: this process
    elsewhere = tmp_path / f".out.h5.otherhost.{writer.pid}.abcd1234.tmp"  # a pid of another host
    unnamed = tmp_path / ".out.h5.abcd1234.tmp"  # written by an earlier version: no writer in the name
    other_target = tmp_path / f".other.h5.{host}.{writer.pid}.abcd1234.tmp"
    for path in (live, elsewhere, unnamed, other_target):
        path.write_bytes(b"")
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(tmp_path.iterdir()) == sorted([target, live, elsewhere, unnamed, other_target])
    # a holder of the folder's lock knows that no one else writes: it may remove them all
    assert leftover_temporaries(target, any_writer=True) == sorted([live, elsewhere, unnamed])


HOLD = """
    import sys, time
    from pcfm.io import exclusive_lock

    with exclusive_lock(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(120)
"""


def test_a_lock_names_its_holder_and_a_killed_holder_does_not_keep_it(tmp_path):
    lock = tmp_path / "folder" / "pcfm.lock"
    holder = start_python(HOLD, lock)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        with pytest.raises(LockHeld, match=re.escape(f"{lock}: held by pid {holder.pid} on host "
                                                     f"{socket.gethostname()}, since ")):
            with exclusive_lock(lock):
                pass
    finally:
        kill(holder)
    assert lock.exists()  # a killed holder deletes nothing, but its lock went with it
    with exclusive_lock(lock):
        with pytest.raises(LockHeld, match=f"held by pid {os.getpid()} "):  # held per open file, not per process
            with exclusive_lock(lock):
                pass
    assert not lock.exists()  # released and deleted
    with pytest.raises(RuntimeError, match="inside"):
        with exclusive_lock(lock):
            raise RuntimeError("inside")
    with exclusive_lock(lock):  # released by the exception
        pass
