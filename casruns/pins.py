"""The pin protocol, writer and reader: how an ingest keeps a concurrent gc off its blobs.

spec/format.md, "Pins and the sweep lock". A writer pins every address it uses (``Pin``),
holding the sweep lock shared around "pin, then check" (``SharedSweep``); gc, holding the
sweep lock exclusively, reads the pins (``read_pins``) before it deletes a chunk of blobs or a
pack. So either gc sees the pin, or the writer sees the blob gone and writes it again.

The life of a pin file, ``blobs/pins/<pid>-<random>.pin``:

1. created as ``*.pin.new``, flocked, renamed to ``*.pin`` (so every ``*.pin`` gc can see is held
   while its writer lives; a writer killed before the rename leaves a ``*.pin.new`` that gc
   deletes once it is old and free: ``stale_new_pins``);
2. appended to, one address a line, never synced (a crash ends the ingest, and the pin with it);
3. settled by freeing its flock once the manifest referencing its blobs is committed; the file
   stays, so a gc that marked before that commit still reads it when it sweeps;
4. deleted by the first gc that found it settled when it began (``settled_pins``): that gc's mark
   saw the manifest.

This module only touches ``blobs/pins/`` and ``blobs/sweep.lock``; the store decides when to pin.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from pathlib import Path

from . import fsutil, layout, locking
from .errors import RegistryError, StrayFile
from .ids import is_address
from .layout import PIN_SUFFIXES

PIN_MAX = 64 << 20  # bytes: a pin of a million addresses; a larger one stops gc (RegistryError)
STALE_NEW = 60.0  # seconds: a free ``*.pin.new`` this old was left by a writer killed while pinning


class Pin:
    """The addresses an in-flight ingest uses: gc roots until released.

    On disk: ``blobs/pins/<pid>-<random>.pin``, one address per line, held under an flock
    for the pin's life, so a pin whose writer died is recognised (its lock is free) and
    ignored. Released (its flock freed, the file left as it is) once the manifest referencing
    the blobs is committed; gc deletes settled pins after a mark that covers them.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.addresses: set[str] = set()
        if path is not None:
            # Created under another name and renamed once locked: a ``*.pin`` file that gc
            # can see is always held, so gc never takes a live pin for a dead one.
            making = path + ".new"
            self._lock = locking.FileLock(making, record=False)
            self._lock.acquire()
            self.fd = self._lock.fd
            os.rename(making, path)

    def add(self, address: str) -> None:
        if address in self.addresses:
            return
        self.addresses.add(address)
        if self.fd is not None:
            os.write(self.fd, (address + "\n").encode())  # O_APPEND is not needed: one writer

    def release(self) -> None:
        """Settle the pin: its flock is freed; the file stays. A gc that marked before our
        manifest commit still finds these addresses among its roots when it sweeps; the next
        gc, whose mark sees the manifest, deletes the file.

        Not renamed (casruns 0.1 renamed it to ``*.done``): a directory listing that runs
        while an entry is renamed can return neither name (ext4 lists in hash order), and a
        gc that missed a settling pin deleted blobs a just-committed manifest references."""
        if self.path is not None and self.fd is not None:
            self._lock.release()
            self.fd = None

    def __enter__(self) -> "Pin":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SharedSweep:
    """``with``: the sweep lock held shared, by one descriptor for the whole process.

    flock belongs to the descriptor, so an unlock by one holder would end every holder's hold:
    holders are counted, and only the first takes the lock and the last frees it (threads, and
    a listing of packs/ nested inside a pin-then-check)."""

    __slots__ = ("fd", "holders", "mutex")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd  # None: a read-only registry without the lock file (nobody can sweep it)
        self.holders = 0
        self.mutex = threading.Lock()

    def __enter__(self) -> None:
        with self.mutex:
            if not self.holders and self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_SH)
            self.holders += 1

    def __exit__(self, *exc) -> None:
        with self.mutex:
            self.holders -= 1
            if not self.holders and self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


class SweepLock:
    """``blobs/sweep.lock``: writers hold it shared around "pin, then check" and around listings
    of ``blobs/packs/``; gc holds it exclusively while it reads the pins and deletes. So gc either
    sees our pin or we see the blob gone (and write it again), and a listing never overlaps a
    pack's deletion."""

    def __init__(self, store_dir: Path) -> None:
        self.dir = store_dir
        self.path = store_dir / "sweep.lock"
        self._share: SharedSweep | None = None

    def shared(self) -> SharedSweep:
        """The shared hold: re-entrant and shared by the process' threads (one descriptor,
        counted holders)."""
        if self._share is None:
            if not self.dir.is_dir():
                fsutil.ensure_dir(self.dir)
            self._share = SharedSweep(fsutil.open_lock_file(self.path))
        return self._share

    def exclusive(self) -> locking.FileLock:
        """The exclusive hold (gc's deletions, pack replacement). Never taken by a thread that
        holds it shared: flock would wait for ourselves."""
        if not self.dir.is_dir():
            fsutil.ensure_dir(self.dir)
        return locking.FileLock(str(self.path))


def pin_files(pins_dir: str | os.PathLike) -> list[str]:
    """The pin files of ``blobs/pins/`` (``*.pin``, and ``*.done`` left by casruns 0.1),
    sorted. Only regular files: a stray with a pin's name pins nothing and is never opened
    (spec/format.md, "Pins and the sweep lock"); nor is a ``pins`` that is not a directory."""
    try:
        if not stat.S_ISDIR(os.lstat(pins_dir).st_mode):
            return []
    except FileNotFoundError:
        return []
    names = layout.scan(Path(pins_dir), lambda n: n.endswith(PIN_SUFFIXES), stat.S_ISREG)[0]
    return [os.path.join(pins_dir, n) for n in names]


def pin_settled(path: str | os.PathLike) -> bool:
    """True unless a live writer holds the pin's flock (a ``*.pin`` is created locked and the
    lock freed when the pin settles). A pin that is gone, or a stray, is settled."""
    return not locking.is_held(path)


def read_pin(path: str | os.PathLike) -> set[str]:
    """The addresses a pin file lists. A stray under a pin's name lists none; a pin that is
    gone raises FileNotFoundError; any other failure RegistryError (gc stops)."""
    try:
        data = fsutil.read_regular(path, PIN_MAX)
    except StrayFile:
        return set()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RegistryError(f"gc stopped: cannot read pin {path}: {e.strerror}", path=os.fspath(path)) from None
    return {a for a in data.decode("ascii", "replace").split() if is_address(a)}


def settled_pins(pins_dir: str | os.PathLike) -> list[str]:
    """The pins settled right now (their flock is free; ``*.done`` of casruns 0.1), or whose
    writer is dead. gc takes this snapshot before its mark: the manifests those ingests
    committed are marked, so these pins are not roots, and gc deletes them at its end."""
    return [p for p in pin_files(pins_dir) if p.endswith(".done") or pin_settled(p)]


def read_pins(pins_dir: str | os.PathLike, skip: set[str]) -> set[str]:
    """Addresses in every pin file except those settled before the mark (which the mark
    covers): live pins, and pins that settled or died after the snapshot, are roots."""
    out: set[str] = set()
    for path in pin_files(pins_dir):  # regular files only: a stray pins nothing
        if path in skip:
            continue
        # casruns 0.1 settled a pin by renaming *.pin to *.done without the sweep lock: a pin
        # listed as *.pin may be *.done by the time we open it. Skipping it lost blobs (the
        # stress test caught it ~5% of runs): read it under its settled name. (Writers now
        # settle by freeing the flock only, so a listing cannot miss a settling pin.)
        names = [path, path[: -len(".pin")] + ".done"] if path.endswith(".pin") else [path]
        for name in names:
            try:
                out.update(read_pin(name))  # O_NONBLOCK|O_NOFOLLOW: a stray reads as empty
                break
            except FileNotFoundError:
                continue
    return out


def live_addresses(pins_dir: str | os.PathLike) -> set[str]:
    """The addresses of the pins whose writer holds them now (not yet released)."""
    out: set[str] = set()
    for path in pin_files(pins_dir):
        if path.endswith(".pin") and not pin_settled(path):
            try:
                out.update(read_pin(path))
            except FileNotFoundError:
                continue
    return out


def stale_new_pins(pins_dir: str | os.PathLike, now: float) -> list[str]:
    """``*.pin.new`` files of writers killed between creating and renaming their pin: regular,
    free, and older than STALE_NEW (a live writer renames its pin at once)."""
    try:
        names = [n for n in os.listdir(pins_dir) if n.endswith(".pin.new")]
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        p = os.path.join(pins_dir, n)
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_NEW and pin_settled(p):
                out.append(p)
        except OSError:
            continue
    return out


def remove(path: str | os.PathLike) -> None:
    """Delete a settled or stale pin file (gc, at its end); one already gone is fine."""
    layout.unlink_quiet(path)
