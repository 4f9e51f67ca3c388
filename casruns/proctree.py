"""The supervisor's process tree: becoming a child subreaper and ending every descendant.

A command can leave its process group (``setsid``, ``setpgid``, a double fork, a daemon that
ignores SIGPIPE and writes nothing), and killing the group then misses it. The supervisor
marks itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``, Linux 3.4+): an orphaned
descendant is re-parented to it instead of to init, so the supervisor can still find it by
walking parent links in ``/proc`` and kill it when the run ends (spec/format.md, "Stray
processes"). Where the call is unavailable the walk finds only descendants whose parents
are alive; the record then under-counts and says so nowhere else (no cgroup is used).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Mark this process a child subreaper. Returns False where the kernel does not allow it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def iter_procs() -> Iterator[tuple[int, str, int, int, int]]:
    """(pid, state, ppid, pgid, start time in clock ticks) for each process in /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # it exited while we listed
        # The command name (field 2) is in parentheses and may contain spaces or ')'.
        rest = data[data.rfind(b")") + 2 :].split()
        try:
            yield int(name), rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19])
        except (IndexError, ValueError):
            continue


def descendants(root: int | None = None, *, groups: dict[int, int] | None = None) -> dict[int, int]:
    """Live (not zombie) descendants of ``root`` (default: this process): pid -> start time.
    ``groups``, if given, is filled with pid -> process group id."""
    root = os.getpid() if root is None else root
    children: dict[int, list[tuple[int, str, int]]] = {}
    for pid, state, ppid, pgid, start in iter_procs():
        children.setdefault(ppid, []).append((pid, state, start))
        if groups is not None:
            groups[pid] = pgid
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, state, start in children.get(todo.pop(), ()):
            if pid in out or pid == root:
                continue
            if state != "Z":
                out[pid] = start
            todo.append(pid)
    return out


def reap_zombies() -> None:
    """Collect the exit status of children that have ended (re-parented orphans included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_descendants(grace: float, *, spare: dict[int, int] | None = None, group: int | None = None) -> int:
    """SIGTERM every descendant of this process, SIGKILL what is left after ``grace`` seconds
    (monotonic), until none is left. ``spare`` (pid -> start time) names processes to leave
    alone. Returns how many distinct processes had to be ended, not counting members of process
    group ``group`` (the command's own group, already killed with it: not strays, only not yet
    gone when we looked).

    Call only once the command's own leader was waited for: this reaps any child.
    """
    spare = spare or {}
    groups: dict[int, int] = {}

    def targets() -> dict[int, int]:
        return {p: st for p, st in descendants(groups=groups).items() if spare.get(p) != st}

    ended: set[tuple[int, int]] = set()

    def end(pid: int, start: int) -> None:
        if groups.get(pid) != group:
            ended.add((pid, start))
        _signal(pid, signal.SIGTERM)

    found = targets()
    if not found:
        return 0
    for pid, start in found.items():
        end(pid, start)
    deadline = time.monotonic() + grace
    while True:
        reap_zombies()
        found = targets()
        if not found:
            return len(ended)
        new = {p: st for p, st in found.items() if (p, st) not in ended}
        for pid, start in new.items():  # forked while we waited: same treatment
            end(pid, start)
        if time.monotonic() >= deadline:
            for pid in found:
                _signal(pid, signal.SIGKILL)
            # a process cannot fork after SIGKILL is delivered; children it made just before
            # are picked up by the next round
            time.sleep(0.02)
        else:
            time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
