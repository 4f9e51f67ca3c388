"""Locks the kernel releases: ``flock`` on lock files, plus who-holds-it records.

Why flock and not lock files judged by age: the kernel drops a flock when its holder dies
(SIGKILL, OOM, reboot), so "the lock is free" is proof the holder is gone, and a slow but
live holder is never wrongly judged stale. A process never judges its own lock stale.

Locks used by casruns (spec/format.md, "Locks"):

* ``runs/<id>/lock``: held briefly around every manifest read-modify-write of that run.
* ``runs/<id>/supervisor.lock``: held by the run's supervisor for its whole life, taken
  by the submitting process before the run becomes visible and inherited by the supervisor,
  so there is no instant at which a live run looks abandoned.
* ``slots/<n>.lock``: one per concurrently running run.
* ``locks/scheduler.lock``: serializes queue decisions (who starts next).

A holder writes a record into long-held lock files (host, pid, process start time) so a
human can see who holds it; the record is information, the flock is the truth.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from . import fsutil
from .errors import Busy, StrayFile

_boot_id: str | None = None


def hostname() -> str:
    """This machine's name (what socket.gethostname returns, without importing socket)."""
    return os.uname().nodename


def boot_id() -> str:
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat).

    Together with the boot id it names a process uniquely, so a reused pid is not
    mistaken for the process we recorded.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def process_matches(pid: int | None, start_time: int | None, boot: str | None) -> bool:
    """True if the process recorded as (pid, start_time, boot) is still alive here."""
    if not pid or boot != boot_id():
        return False
    return start_time is not None and process_start_time(pid) == start_time


def group_members(pgid: int, started_after: int, boot: str | None) -> list[int]:
    """Live processes in group ``pgid`` that started no earlier than ``started_after`` (clock
    ticks since boot) on this boot: what is left of a command whose leader already exited."""
    if boot != boot_id() or not pgid:
        return []
    from .proctree import iter_procs

    return [pid for pid, _state, _ppid, pg, start in iter_procs() if pg == pgid and start >= started_after]


def holder_record() -> dict:
    pid = os.getpid()
    return {
        "host": hostname(),
        "pid": pid,
        "start_time": process_start_time(pid),
        "boot_id": boot_id(),
        "acquired_at": time.time(),
    }


class FileLock:
    """An flock on a file. ``exclusive=False`` takes a shared lock."""

    def __init__(self, path: str | os.PathLike, *, exclusive: bool = True, record: bool = False) -> None:
        self.path = os.fspath(path)
        self.exclusive = exclusive
        self.record = record
        self.fd: int | None = None

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        fd = fsutil.open_lock_file(self.path)
        if fd is None:  # a read-only registry without this lock file: nobody can hold it
            self.fd = None
            return True
        op = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            if blocking and timeout is None:
                fcntl.flock(fd, op)
            else:
                deadline = time.monotonic() + (timeout or 0.0)
                delay = 0.005
                while True:
                    try:
                        fcntl.flock(fd, op | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking or time.monotonic() >= deadline:
                            os.close(fd)
                            return False
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if self.record and self.exclusive:
            write_record(fd)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def write_record(fd: int) -> None:
    data = json.dumps(holder_record()).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass


def read_record(path: str | os.PathLike) -> dict | None:
    from .errors import CasrunsError

    try:
        return json.loads(fsutil.read_regular(path, 64 * 1024) or b"null")
    except (OSError, ValueError, CasrunsError):
        return None


def is_held(path: str | os.PathLike) -> bool:
    """True if some process holds an exclusive flock on ``path`` right now. A lock file that is
    gone, or a stray (a FIFO, a directory, a symlink: never opened or followed), is not held."""
    try:
        fd = fsutil.open_regular(path)
    except (FileNotFoundError, StrayFile):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def try_exclusive(path: str | os.PathLike, what: str) -> FileLock:
    lock = FileLock(path, record=True)
    if not lock.acquire(blocking=False):
        rec = read_record(path) or {}
        raise Busy(f"{what} is held by pid {rec.get('pid', '?')} on {rec.get('host', '?')}", path=os.fspath(path))
    return lock
