"""Waking a waiter when something changes under a set of paths, without busy polling.

``watch(paths)`` returns a :class:`Watch`: ``wait(timeout)`` blocks until something changed
under one of the paths (True) or the timeout passed (False). A watched directory reports
changes of its children (a file created, appended to, renamed into it, removed, its mtime
touched), which is how a reader learns of appends to a spool file and of a manifest renamed
into a run directory; a watched file reports its own changes. A path that does not exist yet
is waited for: its creation wakes the waiter, and from then on it is watched itself; a path
that disappears is waited for again the same way.

Two kinds, with the same interface (``Watch.kind``):

* ``inotify`` (Linux): ``inotify_init1``/``inotify_add_watch`` through ctypes, and ``poll(2)``
  on the descriptor; the process sleeps in the kernel until an event arrives. ctypes is
  imported only when such a watcher is made, so ``status``/``list`` never load it.
* ``poll``: a fallback that compares stat signatures (``st_mtime_ns``, ``st_size``,
  ``st_ino`` of each path and, for a directory, of each of its children) every
  ``POLL_INTERVAL`` (0.05 s). Used when inotify is unavailable (not Linux, no libc symbol,
  ``inotify_init1`` failing, e.g. EMFILE when ``fs.inotify.max_user_instances`` is reached),
  for a path the kernel refuses to watch (ENOSPC from ``max_user_watches``, EACCES), and
  when ``CASRUNS_NOTIFY=poll`` is set (how the tests exercise it).

A wake may be spurious (a heartbeat touched, a sibling created): callers re-check their
condition after every ``wait`` and never rely on an event alone; a change made before the
watch existed is the caller's first check's business (make the watch, then check, then wait).

No PyPI dependency (inotify_simple, watchdog): our need is a handful of syscalls.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import struct
import time
from collections.abc import Iterable

POLL_INTERVAL = 0.05  # seconds between two stat passes of the polling fallback
# The most seconds a waiter sleeps on a watch before it looks anyway: what it waits for may make
# no filesystem event (a supervisor that died), so wait, follow and logs --follow re-check this often.
RECHECK = 1.0

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_EXCL_UNLINK = 0x04000000
_WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
            | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Watch:
    """The interface of both kinds; a context manager that closes what it holds."""

    kind = ""

    def add(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something changed under a watched path (True) or ``timeout`` seconds
        passed (False; None waits for ever)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(paths: Iterable[str | os.PathLike] = ()) -> Watch:
    """The best watcher available here, watching ``paths`` (files or directories)."""
    w: Watch | None = None
    if os.environ.get("CASRUNS_NOTIFY", "") != "poll":
        try:
            w = InotifyWatch()
        except OSError:
            w = None
    if w is None:
        w = PollWatch()
    for p in paths:
        w.add(p)
    return w


# -- polling --------------------------------------------------------------------------------


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    sig: tuple = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        children = []
        try:
            names = sorted(os.listdir(path))
        except OSError:
            names = []
        for name in names:
            try:
                c = os.stat(os.path.join(path, name), follow_symlinks=False)
            except OSError:
                continue
            children.append((name, c.st_mtime_ns, c.st_size, c.st_ino))
        sig += (tuple(children),)
    return sig


class PollWatch(Watch):
    """Compares stat signatures every ``POLL_INTERVAL``; sleeps in between."""

    kind = "poll"

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self._sigs: dict[str, object] = {}

    def add(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        self._sigs[path] = _signature(path)

    def changed(self) -> bool:
        """One stat pass: True if a signature differs from the last pass (and remember it)."""
        changed = False
        for path, old in self._sigs.items():
            new = _signature(path)
            if new != old:
                self._sigs[path] = new
                changed = True
        return changed

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.changed():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(self.interval if left is None else min(self.interval, left))


# -- inotify --------------------------------------------------------------------------------


class InotifyWatch(Watch):
    """inotify on Linux. Each requested path is watched itself when it exists; else its nearest
    existing ancestor is watched for the next missing component to appear."""

    kind = "inotify"

    def __init__(self) -> None:
        import ctypes  # here, not at module level: the status path never pays for it

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError) as e:
            raise OSError(errno.ENOSYS, f"no inotify here: {e}") from e
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._ctypes, self._add_watch, self.fd = ctypes, add_watch, fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._paths: dict[str, int | None] = {}  # requested path -> its own wd (None: pending)
        self._wds: dict[int, str] = {}  # wd -> watched path (a requested one or an ancestor)
        self._waiting: dict[int, set[str]] = {}  # ancestor wd -> child names that matter
        self._fallback: PollWatch | None = None  # paths the kernel would not watch

    def _watch(self, path: str) -> int:
        res = self._add_watch(self.fd, os.fsencode(path), _WATCHED | IN_EXCL_UNLINK)
        if res < 0:
            err = self._ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self._wds[res] = path
        return res

    def add(self, path: str | os.PathLike) -> None:
        path = os.path.abspath(os.fspath(path))
        self._paths.setdefault(path, None)
        self._settle(path)

    def _settle(self, path: str) -> bool:
        """Watch ``path`` itself if it exists, else its nearest ancestor. True if it is watched
        itself now (it appeared)."""
        if self._paths.get(path) is not None:
            return False
        try:
            self._paths[path] = self._watch(path)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._unwatchable(path)
                return False
        child, parent = path, os.path.dirname(path)
        while True:
            try:
                wd = self._watch(parent)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR) and parent != os.path.dirname(parent):
                    child, parent = parent, os.path.dirname(parent)
                    continue
                self._unwatchable(path)
                return False
            self._waiting.setdefault(wd, set()).add(os.path.basename(child))
            break
        try:  # created between our failed look and the ancestor's watch: no event will tell
            self._paths[path] = self._watch(path)
            return True
        except OSError:
            return False

    def _unwatchable(self, path: str) -> None:
        del self._paths[path]
        if self._fallback is None:
            self._fallback = PollWatch()
        self._fallback.add(path)

    def _drain(self) -> bool:
        """Read every queued event; True if one concerns a watched path."""
        relevant = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not buf:
                break
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    relevant = True
                    continue
                relevant |= self._event(wd, mask, os.fsdecode(name))
        return relevant

    def _event(self, wd: int, mask: int, name: str) -> bool:
        """Whether one event concerns a watched path (its own watch, or one appearing)."""
        own = wd in self._paths.values()
        if mask & IN_IGNORED:  # removed, or unmounted: wait for it to come back
            self._wds.pop(wd, None)
            self._waiting.pop(wd, None)
            for p, w in self._paths.items():
                if w == wd:
                    self._paths[p] = None
            return self._settle_pending() or own
        if name in self._waiting.get(wd, ()):
            return self._settle_pending() or own
        return own

    def _settle_pending(self) -> bool:
        appeared = False
        for p in list(self._paths):
            if p in self._paths and self._paths[p] is None:
                appeared |= self._settle(p)
        return appeared

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._fallback is not None:
                if self._fallback.changed():
                    return True
                left = POLL_INTERVAL if left is None else min(left, POLL_INTERVAL)
            ms = -1 if left is None else -(-int(left * 1e6) // 1000)  # rounded up: never spin
            if self._poller.poll(ms) and self._drain():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
