"""The running limit and the queue: which queued run starts next.

There is no daemon. Each run has its own supervisor from the moment it is submitted (it
holds the run's env and secret values in memory only). A queued supervisor polls
:func:`try_claim_slot`; a slot is an flock on ``slots/<n>.lock``, held until the run ends,
so a slot frees itself when its holder dies.

Order: ``queue/`` holds one empty file per queued run, named ``<created ns>-<run_id>``, so
a directory listing sorted by name is oldest first. Under ``locks/scheduler.lock`` a waiter
counts free slots K and may take one only if fewer than K *live* waiters stand before it
(a waiter is live while its run's supervisor lock is held). Cost per poll is K flock
tests plus at most K + (dead entries) liveness tests, so 200 waiters stay cheap.

Crash points: a queue entry without a queued run is ignored and removed; a queued run
without an entry is re-entered by ``reap``.
"""

from __future__ import annotations

import os

from . import fsutil, locking
from .runs import RunDir

SCHEDULER_LOCK = "locks/scheduler.lock"


def entry_name(created_ns: int, run_id: str) -> str:
    return f"{created_ns:020d}-{run_id}"


def enqueue(root: str, run_id: str, created_ns: int) -> None:
    qdir = os.path.join(root, "queue")
    fsutil.ensure_dir(qdir)
    path = os.path.join(qdir, entry_name(created_ns, run_id))
    os.close(fsutil.open_private(path, os.O_WRONLY | os.O_CREAT))
    fsutil.fsync_dir(qdir)


def dequeue(root: str, run_id: str) -> None:
    qdir = os.path.join(root, "queue")
    try:
        names = os.listdir(qdir)
    except FileNotFoundError:
        return
    for name in names:
        if name[21:] == run_id and name[:20].isdigit() and name[20:21] == "-":
            try:
                os.unlink(os.path.join(qdir, name))
            except FileNotFoundError:
                pass


def queued_run_ids(root: str) -> list[str]:
    try:
        names = sorted(os.listdir(os.path.join(root, "queue")))
    except FileNotFoundError:
        return []
    return [n[21:] for n in names if len(n) > 21 and n[20] == "-"]


def try_claim_slot(root: str, run_id: str, max_running: int) -> locking.FileLock | None:
    """Take a slot for ``run_id`` if it is its turn; returns the held slot lock or None."""
    slots_dir = os.path.join(root, "slots")
    fsutil.ensure_dir(slots_dir)
    fsutil.ensure_dir(os.path.join(root, "locks"))
    with locking.FileLock(os.path.join(root, SCHEDULER_LOCK)):
        free: list[locking.FileLock] = []
        try:
            for i in range(max_running):
                lock = locking.FileLock(os.path.join(slots_dir, f"{i}.lock"), record=False)
                if lock.acquire(blocking=False):
                    free.append(lock)
            if not free:
                return None
            ahead = 0
            runs_dir = os.path.join(root, "runs")
            for rid in queued_run_ids(root):
                if rid == run_id:
                    break
                try:
                    live = RunDir(runs_dir, rid).is_supervised()
                except Exception:
                    live = False
                if live:
                    ahead += 1
                    if ahead >= len(free):
                        return None
            mine = free.pop(0)
            locking.write_record(mine.fd)  # type: ignore[arg-type]
            return mine
        finally:
            for lock in free:
                lock.release()
