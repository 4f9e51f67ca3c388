"""A run directory: its files, atomic creation, reads, and locked manifest updates.

Layout of ``runs/<run_id>/`` (spec/format.md, "Run directories")::

    manifest.toml      the run's record (authoritative)
    manifest.json      read cache of manifest.toml (see manifest.py)
    lock               flock held around each manifest read-modify-write
    supervisor.lock    flock held by the run's supervisor for its whole life
    heartbeat          its mtime is the supervisor's last heartbeat
    cancel             exists once a cancel was requested
    env.json           non-secret env values while queued (0600, removed at start)
    spool/             stdout, stderr, transcript while the run is active
    artifacts/         CASRUNS_ARTIFACTS_DIR while the run is active
    supervisor.log     the supervisor's own diagnostics

Every committed change to a run is also an event in the registry's journal (``events/``,
journal.py): each update numbers its events in the manifest (``event_seq``) and records them
as pending before its commit, then appends them after it (spec/events.md, "The commit").

Creation is atomic: the directory is built under ``runs/.new-*`` and renamed to its id, so
a reader sees a run with a complete manifest or no run at all, and two submits with the
same caller-chosen id cannot both create it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from . import events, fsutil, locking, manifest
from .errors import CasrunsError, CorruptManifest, RegistryError, RunNotFound, UnsafePath
from .journal import Journal, Pending
from .ids import is_run_id, validate_run_id

SPOOL_STREAMS = ("stdout", "stderr", "transcript")


class RunExists(Exception):
    """Raised by :func:`create` when the run id is taken (the caller decides what that means)."""


class RunDir:
    def __init__(self, runs_dir: str | os.PathLike, run_id: str) -> None:
        self.run_id = validate_run_id(run_id)
        self.path = os.path.join(os.fspath(runs_dir), run_id)
        self.manifest_path = os.path.join(self.path, "manifest.toml")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def journal(self) -> Journal:
        return journal_of(os.path.dirname(self.path))

    @property
    def lock_path(self) -> str:
        return self.file("lock")

    @property
    def supervisor_lock_path(self) -> str:
        return self.file("supervisor.lock")

    @property
    def heartbeat_path(self) -> str:
        return self.file("heartbeat")

    @property
    def cancel_path(self) -> str:
        return self.file("cancel")

    @property
    def spool_dir(self) -> str:
        return self.file("spool")

    @property
    def artifacts_dir(self) -> str:
        return self.file("artifacts")

    def spool(self, stream: str) -> str:
        return os.path.join(self.spool_dir, stream)

    def _check_not_link(self) -> None:
        if os.path.islink(self.path):
            raise UnsafePath(f"run directory {self.path} is a symlink; refusing to follow it")

    def exists(self) -> bool:
        return os.path.isfile(self.manifest_path)

    def read(self) -> dict:
        """The manifest for display (``status``, ``list``): via its cache when the cache's checksum
        holds and its tag matches, else the TOML. Nothing that deletes or rewrites may decide on
        it: use :meth:`read_fresh`. Raises RunNotFound, CorruptManifest, StrayFile."""
        return self._read(lambda path: (manifest.read(path), None))[0]

    def read_fresh(self, *, cache: bool = True) -> dict:
        """The manifest as ``manifest.toml`` holds it now, checksum checked (spec/format.md, "What
        each reader trusts"): what gc, retention, every locked update and verify decide on. The
        cache may stand in for the parse only when it was built from exactly these bytes."""
        return self._read(lambda path: manifest.read_toml_checked(path, cache=cache))[0]

    def read_checked(self) -> tuple[dict, bool]:
        """For verify: the TOML parsed (never the cache, nothing written), and whether it carries
        a checksum (False for a manifest written by casruns 0.2 or older)."""
        m, checked = self._read(lambda path: manifest.read_toml_checked(path, cache=False))
        return m, bool(checked)

    def _read(self, reader) -> tuple[dict, bool | None]:
        self._check_not_link()
        try:
            m, extra = reader(self.manifest_path)
        except FileNotFoundError:
            raise RunNotFound(f"no run {self.run_id} in this registry", run_id=self.run_id) from None
        except OSError as e:
            raise RegistryError(f"cannot read {self.manifest_path}: {e.strerror}", path=self.manifest_path) from e
        if m.get("run_id") != self.run_id:
            raise CorruptManifest(f"manifest {self.manifest_path} names run {m.get('run_id')!r}")
        return m, extra

    @contextmanager
    def locked(self) -> Iterator[None]:
        self._check_not_link()
        if not os.path.isdir(self.path):
            raise RunNotFound(f"no run {self.run_id} in this registry", run_id=self.run_id)
        with locking.FileLock(self.lock_path) as lock:
            # While we waited, gc may have renamed this run to its trash and a pull or a
            # submit may have created the id anew: then we hold the old run's lock, not this one.
            held = os.fstat(lock.fd)  # type: ignore[arg-type]
            try:
                now = os.stat(self.lock_path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                raise RunNotFound(f"run {self.run_id} was removed while waiting for its lock", run_id=self.run_id)
            yield

    @contextmanager
    def update(self) -> Iterator[dict]:
        """Read-modify-write the manifest under the run's lock; writes only if it changed.

        Every writer (supervisor, cancel, promote, reaper) goes through here, so concurrent
        updates serialize and none overwrites another's change.
        """
        with self.locked():
            m = self.read_fresh()
            self.settle_events(m.get("incarnation", ""))  # appends only: the manifest stays as read
            before = manifest.dumps(m)
            import copy

            old = copy.deepcopy(m)
            yield m
            if manifest.dumps(m) != before:
                pending = stage(self.journal, m, events.changes(old, m))
                try:
                    manifest.write(self.manifest_path, m)
                except BaseException:
                    settle_failed(pending, os.path.dirname(self.path))
                    raise
                pending.publish()

    def settle_events(self, incarnation: str | None = None) -> None:
        """Settle this run's pending events that a dead writer left (under the run's lock, so
        the next change is reported after them: per-run order holds), waiting for a live writer
        of ``incarnation`` (the creator publishing its ``created``) but not of another."""
        runs_dir = os.path.dirname(self.path)
        self.journal.resolve(lambda doc: committed(runs_dir, doc), self.run_id, wait=True, incarnation=incarnation)

    def remove(self, target: str, reason: str) -> Pending:
        """gc: rename the run to ``target`` (its trash) under the run's lock the caller holds,
        with its ``removed`` event pending; the caller publishes it once the rename is durable."""
        m = self.read_fresh()
        self.settle_events(m.get("incarnation", ""))
        journal = journal_of(os.path.dirname(self.path), gc=True)  # may use gc's own reserve: removing frees space
        pending = stage(journal, m, events.removed(m, reason), kind="removed")
        try:
            os.rename(self.path, target)
        except BaseException:
            pending.abandon()
            raise
        return pending

    def is_supervised(self) -> bool:
        return locking.is_held(self.supervisor_lock_path)

    def mtime(self, name: str) -> float | None:
        try:
            return os.stat(self.file(name)).st_mtime
        except OSError:
            return None

    def last_activity(self) -> float | None:
        times = [t for t in (self.mtime(f"spool/{s}") for s in ("stdout", "stderr")) if t is not None]
        return max(times) if times else None

    def remove_workspace(self) -> None:
        """Drop spool and artifact work files once their content is committed to the store."""
        for name in ("spool", "artifacts"):
            path = self.file(name)
            if os.path.islink(path):
                os.unlink(path)  # the link only: its target is not ours (rmtree would refuse it forever)
            else:
                _rmtree(path)
        for name in ("env.json", "cancel"):
            try:
                os.unlink(self.file(name))
            except OSError:
                pass


def create(runs_dir: str | os.PathLike, m: dict, *, files: dict[str, bytes] | None = None) -> tuple[RunDir, locking.FileLock]:
    """Create a run directory atomically; returns it with its supervisor lock held.

    Crash points: before the final rename only ``runs/.new-*`` exists (invisible to readers,
    removed by gc); after it the run exists with a complete, durable manifest.
    Raises :class:`RunExists` if the id is taken.
    """
    runs_dir = os.fspath(runs_dir)
    run = RunDir(runs_dir, m["run_id"])
    if os.path.lexists(run.path):
        raise RunExists(run.run_id)
    m["incarnation"] = os.urandom(8).hex()  # a run id created again after gc is a new run
    m["event_seq"] = 0
    pending = None
    tmp = os.path.join(runs_dir, f".new-{run.run_id}-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp, fsutil.DIR_MODE)
    os.chmod(tmp, fsutil.DIR_MODE)
    lock = None
    try:
        dirs = fsutil.DirSync()
        for sub in ("spool", "artifacts"):
            os.mkdir(os.path.join(tmp, sub), fsutil.DIR_MODE)
            os.chmod(os.path.join(tmp, sub), fsutil.DIR_MODE)
        for name in ("lock", "supervisor.lock", "heartbeat"):
            os.close(fsutil.open_private(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT))
        for name, data in (files or {}).items():
            fsutil.atomic_write(os.path.join(tmp, name), data, dirs=dirs)
        evs = events.created(m)
        events.number(evs, m)
        manifest.write(os.path.join(tmp, "manifest.toml"), m, dirs=dirs)
        lock = locking.FileLock(os.path.join(tmp, "supervisor.lock"), record=True)
        lock.acquire()
        fsutil.fsync_dir(tmp)
        pending = stage(run.journal, m, evs, numbered=True)
        try:
            os.rename(tmp, run.path)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RunExists(run.run_id) from None
            raise
        fsutil.fsync_dir(runs_dir)
        # the cache's tag is the manifest's inode, which the directory rename kept.
    except BaseException:
        if pending is not None:
            settle_failed(pending, runs_dir)
        if lock is not None:
            lock.release()
        _rmtree(tmp)
        raise
    pending.publish()
    return run, lock


def journal_of(runs_dir: str | os.PathLike, *, gc: bool = False) -> Journal:
    return Journal(os.path.join(os.path.dirname(os.fspath(runs_dir)), "events"), gc=gc)


def stage(journal: Journal, m: dict, evs: list[dict], *, kind: str = "update", numbered: bool = False) -> Pending:
    """Number a change's events (``event_seq`` in ``m``) and record them as pending."""
    if not numbered:
        events.number(evs, m)
    # an earlier change of this run whose events could not be appended yet (a stray segment, a
    # full disk) goes first: then this one waits, pending, behind it (per-run order)
    behind = not numbered and m.get("incarnation", "") in journal.pending_incarnations(m["run_id"])
    try:
        pending = journal.prepare(m["run_id"], m.get("incarnation", ""), evs, kind=kind)
    except OSError as e:
        raise fsutil.write_error(f"cannot record the events of run {m['run_id']}", e, journal.pending_dir) from e
    pending.behind = behind
    return pending


def settle_failed(pending: Pending, runs_dir: str) -> None:
    """A commit that raised may still have happened (its rename done, the directory sync after it
    failed, or an interrupt): then its events are published, else dropped; if that cannot be told
    now, the record is left to a repairer."""
    try:
        verdict = committed(runs_dir, pending.doc)
    except Exception:
        verdict = None
    if verdict:
        pending.publish()
    elif verdict is False:
        pending.abandon()
    else:
        pending.close()


def committed(runs_dir: str, doc: dict) -> bool | None:
    """Did the change a pending record stands for commit? (``Journal.resolve``'s question.)
    A removal committed once the run is gone (or is another incarnation); any other change
    once the manifest of the same incarnation has reached its sequence number. None: the
    manifest cannot be read now (decided later)."""
    run = RunDir(runs_dir, doc["run_id"])
    try:
        m = run.read_fresh()
    except RunNotFound:
        m = None
    except CasrunsError:
        return None
    same = m is not None and m.get("incarnation", "") == doc.get("incarnation", "")
    if doc.get("kind") == "removed":
        return not same
    return same and int(m.get("event_seq") or 0) >= doc["seq"]


def _rmtree(path: str) -> None:
    import shutil  # only writers pay for it

    shutil.rmtree(path, ignore_errors=True)


def run_stray(runs_dir: str | os.PathLike, rid: str) -> dict | None:
    """The stray that ``runs/<rid>`` is, or None (a run, or no such entry).

    The one rule readers, gc and verify share (spec/format.md, "Strays"): an entry that is not
    a real directory (a file, a FIFO, a symlink), or a directory with no regular
    ``manifest.toml`` (none, or a directory, FIFO or symlink by that name), is not a run. Types
    come from ``lstat``: nothing is opened or followed. Returns ``{path, kind, run_id, message}``
    with ``path`` relative to the registry root.
    """
    runs_dir = os.fspath(runs_dir)
    for rel, is_kind, want in ((rid, stat.S_ISDIR, "directory"), (f"{rid}/manifest.toml", stat.S_ISREG, "regular file")):
        try:
            mode = os.lstat(os.path.join(runs_dir, rel)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if rel == rid:
                return None  # no such entry: not found, reported as such by whoever asked
            return {"path": f"runs/{rid}", "kind": "directory", "run_id": rid, "message": f"runs/{rid} is a directory without manifest.toml, not a run"}
        if not is_kind(mode):
            kind = fsutil.kind_of(mode)
            message = f"runs/{rel} is a {kind.replace('_', ' ')}, not a {want}: runs/{rid} is not a run"
            return {"path": f"runs/{rel}", "kind": kind, "run_id": rid, "message": message}
    return None


def iter_run_ids(runs_dir: str | os.PathLike) -> Iterator[str]:
    """Run ids present in ``runs/``, skipping temp and trash entries (names starting with '.')."""
    try:
        names = os.listdir(runs_dir)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(".") and is_run_id(name):
            yield name
