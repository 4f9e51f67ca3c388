"""Archives: promoted evidence copied to other machines, in the same content-addressed format.

An archive is a directory tree (spec/format.md, "Archives")::

    casruns-archive.toml           format = "casruns-archive", version = 1
    blobs/<ab>/<62 hex>            the zstd frames, byte for byte as in a registry
    runs/<run_id>/manifest.toml    the run's manifest, written last

Runs from many registries share blobs: a blob the archive already holds is never sent again.

Write order and visibility: for each run, its blobs (artifact files and logs first, the tree
next), then the manifest; so an archive never holds a manifest whose blobs are missing, and an
interrupted push resumes by skipping what arrived. A reader never sees a partial object under
its final name: on filesystems (local, NFS, sftp) objects are written under ``tmp/`` and
renamed; on object stores (S3) a PUT is atomic, and its size is checked after the upload.
Pull trusts nothing: each blob is decompressed and re-hashed against its address before it
enters the local store. A push skips a blob whose archived object has the right size (one
metadata request); ``--verify-existing`` re-hashes those objects and replaces bad ones, and
``verify --against --read-data`` re-hashes them without changing anything. A directory
archive's objects are opened as regular files only (a FIFO or a symlink is ``stray_file``).

A push or pull that fails after it started carries what it completed in the error's
``details.report``; a full disk (ENOSPC, EDQUOT) there is ``no_space``, with nothing half-written.

Local paths need nothing beyond casruns; other URLs go through fsspec, with the backends as
optional extras (``casruns[s3]``, ``casruns[sftp]``). Credentials come from the usual
environment variables or the registry config's ``[archive]`` table, never from manifests.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import archiveconfig, archiveindex
from . import archiveproto as proto
from . import faults, query
from . import manifest as mf
from .errors import (
    BlobNotFound, CasrunsError, CorruptManifest, IntegrityError, InvalidInput, InvalidRunId, NoSpace,
    ArchiveUnavailable, RegistryError, RunNotFound, StrayFile, TooLarge, UnsupportedFormat,
)
from .ids import validate_run_id
from .remotes import CHUNK, FsspecRemote, LocalRemote, Remote, _backend_error, _no_space  # noqa: F401 - FsspecRemote, LocalRemote re-exported

if TYPE_CHECKING:
    from .root import RegistryRoot

MARKER = "casruns-archive.toml"
FORMAT = "casruns-archive"
VERSION = 1


MARKER_MAX = 64 * 1024  # bytes: the marker is a few lines


def blob_key(address: str) -> str:
    from .layout import loose_name  # the store's layout: archives keep it (validates the address)

    return f"blobs/{loose_name(address)}"


def manifest_key(run_id: str) -> str:
    return f"runs/{validate_run_id(run_id)}/manifest.toml"


def _check_marker(remote: Remote) -> None:
    """Readers refuse what is not a casruns archive of a version they know."""
    import tomllib

    from .errors import UnsupportedFormat

    if remote.size(MARKER) is None:
        raise UnsupportedFormat(f"{remote.url} is not a casruns archive (no {MARKER})")
    try:
        doc = tomllib.loads(remote.get_bytes(MARKER, limit=MARKER_MAX).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedFormat(f"{remote.url}/{MARKER} is not a casruns archive marker (not UTF-8 TOML: {e})") from None
    version = doc.get("version")
    if doc.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise UnsupportedFormat(f"{remote.url} is not a casruns archive this version can read ({MARKER}: {doc})")


def open_remote(url: str, registry: "RegistryRoot") -> Remote:
    """The archive at ``url``, opened by the backend its scheme names (casruns/backends.py)."""
    from .backends import open_archive

    return open_archive(
        url,
        config=lambda: (registry.config.raw.get("archive") or {}) if registry.check_format() else {},
        plugins=lambda: registry.plugins,
    )


def _ensure_marker(remote: Remote) -> None:
    if remote.size(MARKER) is None:
        remote.put_bytes(f'format = "{FORMAT}"\nversion = {VERSION}\n'.encode(), MARKER)
        return
    _check_marker(remote)


def _run_blobs(registry: "RegistryRoot", m: dict) -> list[str]:
    """A run's blobs in push order: artifact files and logs, then the tree (the manifest last)."""
    from .tree import blob_refs

    refs = list(blob_refs(registry.store, m))
    files = sorted(a for where, a in refs if where.startswith("artifacts/"))
    logs = [a for where, a in refs if where.startswith("logs.")]
    tree = [a for where, a in refs if where == "artifacts.tree"]
    return list(dict.fromkeys(files + logs + tree))


RENEWALS = 5  # lease renewals one run's push may need before it gives up (a store too slow for gc.lease)
INDEX_ON_PUSH = True  # push appends an index segment (tests of the index reader turn it off to stage their own)
JOBS = 8  # concurrent requests: an object store is latency-bound (~19 requests a run, one at a time)


def _interrupted(e: Exception, report: dict, where: str, done: str) -> Exception:
    """The error that ends a push or pull, carrying what it completed before (``details.report``).
    A full disk or quota becomes ``no_space`` (one line) instead of an internal error."""
    if _no_space(e):
        return NoSpace(f"no space left on the device {where}; {done} before it", report=report)
    if isinstance(e, CasrunsError):
        e.details.setdefault("report", report)
        return e
    if _backend_error(e):  # a read that failed mid-stream, say
        return ArchiveUnavailable(f"the archive failed {where}: {type(e).__name__}: {' '.join(str(e).split())[:300]}; {done} before it", report=report)
    return e


def _raise_interrupted(e: Exception, report: dict, where: str, done: str):
    err = _interrupted(e, report, where, done)
    if err is e:
        raise e
    raise err from e


def check_archived(remote: Remote, address: str) -> str | None:
    """Stream an archived blob through decode and re-hash (bounded memory): None if it is a
    good copy, else why not."""
    from .frames import FrameCheck

    check = FrameCheck(address)
    try:
        with remote.open(blob_key(address)) as f:
            while chunk := f.read(CHUNK):
                check.feed(chunk)
        check.finish()
    except (IntegrityError, StrayFile) as e:
        return e.message
    return None


def archived_chunks(remote: Remote, address: str, limit: int | None = None) -> Iterator[bytes]:
    """An archived blob's content, decoded as it streams in and verified against its address at
    the end (IntegrityError then: a consumer that printed the bytes must fail, as ``cat`` does)."""
    from .frames import FrameCheck

    check = FrameCheck(address)
    with remote.open(blob_key(address)) as f:
        while chunk := f.read(CHUNK):
            for out in check.pieces(chunk):  # a bomb's pieces stream through: never held whole
                if limit is not None and check.size > limit:
                    raise TooLarge(f"archived blob {address} is over {limit} bytes", address=address)
                yield out
    check.finish()


def archived_run(registry: "RegistryRoot", src: str, run_id: str) -> tuple[Remote, dict]:
    """The archive and one run's manifest there (checked like a local one)."""
    remote = open_remote(src, registry)
    _check_marker(remote)
    return remote, remote_manifest(remote, validate_run_id(run_id))


def archived_tree(remote: Remote, m: dict):
    from .tree import TREE_MAX, Tree

    ref = (m.get("artifacts") or {}).get("tree")
    return Tree.from_bytes(b"".join(archived_chunks(remote, ref, TREE_MAX))) if ref else Tree()


def push(
    registry: "RegistryRoot", dest: str, run_ids: list[str] | None, *, promoted: bool = False, progress=None, jobs: int = JOBS,
    verify_existing: bool = False,
) -> dict:
    """Copy finished runs to ``dest``. A blob whose archived object has the local frame's size
    is skipped; with ``verify_existing`` it is re-read (decoded and re-hashed) first, and a bad
    copy is overwritten with the registry's (``blobs_replaced``)."""
    from concurrent.futures import ThreadPoolExecutor

    if not run_ids and not promoted:
        raise InvalidInput("name the runs to push, or use --promoted")
    if jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {jobs}")
    ids = list(run_ids or [])
    if promoted:
        ids += [r["run_id"] for r in query.list_runs(registry, promoted=True) if r["run_id"] not in ids]
    manifests = {}
    for rid in ids:
        m = registry.run_dir(rid).read_fresh()
        if m["status"] not in mf.TERMINAL:
            raise InvalidInput(f"run {rid} is {m['status']}; only finished runs can be archived")
        if m.get("collection_pending"):
            raise InvalidInput(
                f"run {rid} ended on a full disk and its output is not stored yet; run casruns reap once there is space, then push"
            )
        manifests[rid] = m
    remote = open_remote(dest, registry)
    report = {
        "schema": "casruns/archive-push/v1", "dest": remote.url, "runs": 0, "blobs_sent": 0, "blobs_skipped": 0,
        "bytes_sent": 0, "bytes_logical": 0, "blobs_verified": 0, "blobs_replaced": 0, "blobs_touched": 0,
        "manifests_merged": 0, "rechecks": 0,
    }
    store = registry.store
    touched_by: dict[str, set[str]] = {}  # run -> the gc marks whose blobs this push touched for it
    counted: set[tuple[str, str]] = set()  # (run, blob) pairs already in the report's per-run counts
    marks = None
    present: set[str] = set()  # blobs known to be in the archive: shared ones are asked about once
    lock = threading.Lock()

    def send(rid: str, address: str) -> None:
        """One blob, on a worker thread: look, then (verified) upload if the archive lacks it."""
        try:
            local, frame, size = store.frame_source(address)  # a loose file, or a frame from a pack
        except BlobNotFound:
            raise BlobNotFound(f"run {rid} references blob {address}, which is not in this registry; run casruns verify") from None
        got = remote.size(blob_key(address))
        there = got == size
        verified = there and verify_existing
        if verified and check_archived(remote, address) is not None:
            there = False  # a bad copy of the same size: replaced below
        # present, but an open gc mark lists it: write it again so that its store time passes
        # the mark's and the sweep spares it (spec/archive-gc.md, "touch")
        touched = there and bool(marks.marked(address))
        if not there or touched:
            # never archive a corrupt blob: a packed frame is checked as the very bytes sent
            if frame is not None:
                store.check_frame(address, frame)
                remote.put_bytes(frame, blob_key(address))
            else:
                for _ in store.iter_chunks(address):
                    pass
                remote.put_file(local, blob_key(address), size)
        with lock:
            present.add(address)
            first = (rid, address) not in counted  # a recheck looks again but the report is of the runs
            counted.add((rid, address))
            report["bytes_logical"] += size if first else 0
            report["blobs_verified"] += verified and first
            if touched:
                report["blobs_touched"] += 1
                touched_by.setdefault(rid, set()).update(marks.marked(address))
            if there:
                report["blobs_skipped"] += first
                return
            report["blobs_replaced"] += got is not None  # a wrong size, or (verified) wrong content
            report["blobs_sent"] += 1
            report["bytes_sent"] += size
        faults.point("archive_push_blob")  # archive_push_blob=kill@N: killed after the N-th blob sent

    rid = None
    lease = None
    indexed: list[dict] = []  # index entries of the runs pushed (archiveindex.append, once at the end)
    try:
        _ensure_marker(remote)
        # the lease first, then the marks: gc writes its mark first, then reads the leases, so
        # one of the two always sees the other (spec/archive-gc.md, race 4)
        period = archiveconfig.read(remote)[0].lease
        me = proto.machine_of(registry)
        lease = proto.Refresher(remote, f"{proto.LEASES}/{proto.machine_key(me)}-{proto.nonce()}.lease",
                                {"schema": "casruns/archive-lease/v1", "machine": me, "pid": os.getpid()}, period).start()
        faults.point("archive_push_after_lease")
        marks = proto.Marks(remote)
        dead_sweeps: dict[str, str] = {}  # sweep objects of dead gcs, judged once
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="casruns-push") as pool:

            def send_all(rid: str, addresses: list[str]) -> None:
                futures = [pool.submit(send, rid, a) for a in addresses]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()  # the first failure ends the push: send nothing more
                    raise

            for i, (rid, m) in enumerate(manifests.items()):
                if progress:
                    progress("pushing runs", i + 1, len(manifests))
                todo = []
                run_blobs = _run_blobs(registry, m)
                for address in run_blobs:
                    if address in present and not marks.marked(address):
                        report["bytes_logical"] += store.frame_size(address)
                        report["blobs_skipped"] += 1
                        counted.add((rid, address))
                    else:
                        todo.append(address)
                # every blob of the run is in the archive before its manifest is written
                send_all(rid, todo)
                # Blobs touched for an open mark must not be deleted by a sweep that listed them
                # before the touch: wait out such a sweep, then look again. A lease whose last
                # rewrite is too old may have been judged stale by a gc: look again as well.
                renewals = 0
                while True:
                    if not lease.healthy():
                        renewals += 1
                        if renewals > RENEWALS:
                            raise ArchiveUnavailable(
                                f"{remote.url}: this push's lease kept going unrefreshed for too long (writes slower than "
                                f"gc.lease={period:g}s allows); raise gc.lease (archive config) and push again")
                        # a gap in the lease's rewrites long enough that a gc may have judged this
                        # push gone: nothing skipped before it can be trusted. Renew (then read the
                        # marks: lease first, as at the start), forget what was seen, look again.
                        lease.renew()
                        present.clear()
                    elif not (touched_by.get(rid) and marks.wait_for_sweeps(touched_by.pop(rid), period, dead=dead_sweeps)):
                        break
                    touched_by.pop(rid, None)
                    marks = proto.Marks(remote)
                    present.difference_update(run_blobs)
                    report["rechecks"] += 1
                    send_all(rid, run_blobs)
                faults.point("archive_push_before_manifest")
                with open(registry.run_dir(rid).manifest_path, "rb") as f:
                    data = f.read()
                key = manifest_key(rid)
                # last: the run's commit point, merged with a copy another machine pushed
                outcome, published, version = proto.publish_manifest(remote, key, data, m)
                report["manifests_merged"] += outcome == "merged"
                if INDEX_ON_PUSH and version and all(published.get(k) == m.get(k) for k in ("logs", "artifacts")):
                    indexed.append(archiveindex.entry(rid, version, published, run_blobs, registry.config))
                report["runs"] += 1
    except Exception as e:
        where = f"of the archive {remote.url}" + (f" while pushing run {rid}" if rid else "")
        _raise_interrupted(e, report, where, f"{report['runs']} runs were pushed whole")
    finally:
        if indexed:
            try:  # after the manifests they name; a lost segment costs list requests, never truth
                archiveindex.append(remote, proto.machine_key(me), indexed)
            except CasrunsError:
                pass
        if lease is not None:
            lease.stop()
    return report


def remote_manifest(remote: Remote, run_id: str) -> dict:
    m = mf.loads(remote.get_bytes(manifest_key(run_id), limit=mf.MANIFEST_LIMIT), f"{remote.url}/{manifest_key(run_id)}")
    if m["run_id"] != run_id:
        raise RegistryError(f"{remote.url}: manifest of {run_id} names run {m['run_id']}")
    return m


def list_archive(registry: "RegistryRoot", src: str, *, statuses=(), labels=None, promoted: bool | None = None,
                 since: str | None = None, limit: int | None = None) -> dict:
    """The archive's runs, newest first, with the registry's ``list`` filters (status: any of;
    labels: all of; promoted; created since; at most ``limit``).

    One listing of ``runs/`` (paged by the store), one of ``index/`` and a GET per index
    segment; a run's summary comes from the index when its entry was written for the very
    manifest version the listing shows, else its manifest is read (casruns/archiveindex.py)."""
    from . import archiveindex
    from .ids import is_run_id

    flt = query.ListFilter(statuses=statuses, labels=labels, since=since, limit=limit, promoted=promoted)
    remote = open_remote(src, registry)
    _check_marker(remote)
    versions: dict[str, str | None] = {}
    if type(remote).objects is Remote.objects:  # a plugin's remote without listings: no index
        versions = dict.fromkeys(remote.list_runs())
    else:
        for o in remote.objects("runs"):
            parts = o.key.split("/")
            if len(parts) == 3 and parts[2] == "manifest.toml" and is_run_id(parts[1]):
                versions[parts[1]] = o.version
    index = archiveindex.load(remote, blobs=False) if versions and None not in versions.values() else archiveindex.Index()
    runs, errors = [], []
    for rid in sorted(versions):
        s = index.summary(rid, versions[rid])
        if s is None:
            try:
                s = archiveindex.summary(remote_manifest(remote, rid), registry.config)
            except (CorruptManifest, UnsupportedFormat, RunNotFound, InvalidRunId) as e:
                errors.append({"run_id": rid, "code": e.code, "message": e.message})  # hides only that run
                continue
        if (flt.statuses and s["status"] not in flt.statuses) or not flt.manifest_matches(
                {"labels": s["labels"], "created_at": s["created_at"], "retention": {"promoted": s["promoted"]}}):
            continue
        runs.append({"run_id": rid, "status": s["status"], "promoted": s["promoted"], "created_at": s["created_at"],
                     "labels": s["labels"], "origin": s["origin"]})
    runs.sort(key=lambda r: (r["created_at"] or "", r["run_id"]), reverse=True)
    if flt.limit is not None:
        runs = runs[: flt.limit]
    out = {"schema": "casruns/archive-list/v1", "src": remote.url, "runs": runs}
    if errors:
        out["errors"] = errors
    return out


def pull(registry: "RegistryRoot", src: str, run_ids: list[str] | None, *, progress=None, jobs: int = JOBS) -> dict:
    if jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {jobs}")
    remote = open_remote(src, registry)
    _check_marker(remote)
    ids = list(run_ids) if run_ids else remote.list_runs()
    report = {
        "schema": "casruns/archive-pull/v1", "src": remote.url, "runs": 0, "runs_present": 0,
        "blobs_received": 0, "blobs_present": 0, "bytes_received": 0, "blobs_repaired": 0, "pulled": [],
    }
    rid = None
    try:
        registry.ensure()
        for i, rid in enumerate(ids):
            if progress:
                progress("pulling runs", i + 1, len(ids))
            try:
                _pull_run(registry, remote, rid, report, jobs)
            except (CorruptManifest, UnsupportedFormat, RunNotFound, InvalidRunId, TooLarge) as e:
                # one bad run in the archive is skipped and reported, never half-stored, and
                # never stops the runs after it (the CLI then exits 6, as list does)
                report.setdefault("errors", []).append({"run_id": rid, "code": e.code, "message": e.message})
    except Exception as e:
        where = f"of the registry {registry.root}" + (f" while pulling run {rid} from {remote.url}" if rid else "")
        _raise_interrupted(e, report, where, f"{report['runs']} runs were pulled whole")
    return report


def _pull_run(registry: "RegistryRoot", remote: Remote, rid: str, report: dict, jobs: int) -> None:
    from . import runs as runs_mod
    from .tree import Tree

    store = registry.store
    if registry.run_dir(rid).exists():
        report["runs_present"] += 1
        _repair(registry, remote, rid, report)
        return
    m = remote_manifest(remote, rid)  # checked like a local manifest before anything of it is stored
    if m["status"] not in mf.TERMINAL or m.get("collection_pending"):
        raise CorruptManifest(f"{remote.url}: run {rid} is {m['status']} or not fully collected; an archive holds finished runs only")
    m = _redact_pulled(registry, m)
    with store.pin() as pin:
        with store.batch(pin) as batch:
            wanted: list[str] = [ref["blake3"] for ref in (m.get("logs") or {}).values() if isinstance(ref, dict) and ref.get("blake3")]
            tree_ref = (m.get("artifacts") or {}).get("tree")
            if tree_ref:
                _import(remote, store, batch, tree_ref, report)
                batch.sync()
                wanted += sorted(Tree.load(store, tree_ref).addresses())
            fetched = _Prefetch(remote, [a for a in dict.fromkeys(wanted) if batch.pending(a) is None and not store.contains(a)], jobs)
            try:
                for address in dict.fromkeys(wanted):
                    _import(remote, store, batch, address, report, fetched)
                    if report["runs"]:
                        faults.point("archive_pull_after_first_run")
            finally:
                fetched.close()
            # synced here, not on leaving the block: a sync that fails (a full disk) then
            # discards the batch's temps instead of leaving them behind
            batch.sync()
        # every blob is verified and durable: now the manifest (the commit point)
        try:
            run, lock = runs_mod.create(registry.runs_dir, m)
        except runs_mod.RunExists:
            report["runs_present"] += 1
            return
        lock.release()
        run.remove_workspace()
    report["runs"] += 1
    report["pulled"].append(rid)


def _redact_pulled(registry: "RegistryRoot", m: dict) -> dict:
    """An archive written by an older casruns (or by hand) must not plant a credential: the
    strings a record shows pass today's detectors before the manifest is stored."""
    redactor = registry.redactor()
    out = dict(m)
    for key in ("labels", "runtime", "preview", "error", "cancel"):
        if isinstance(out.get(key), dict):
            out[key] = redactor.metadata(out[key])
    ret = out.get("retention")
    if isinstance(ret, dict) and isinstance(ret.get("history"), list):
        out["retention"] = {**ret, "history": redactor.metadata(ret["history"])}
    req = out.get("request")
    if isinstance(req, dict) and isinstance(req.get("argv"), list):
        argv = [redactor.text(a) for a in req["argv"]]
        if argv != req["argv"]:
            out["request"] = {**req, "argv": argv, "argv_redacted": True}
    mf.check_schema(out, f"pulled manifest of {m.get('run_id')}")
    return out


def _repair(registry: "RegistryRoot", remote: Remote, run_id: str, report: dict) -> None:
    """A run that is here already may miss blobs (quarantined by verify): fetch those."""
    from .tree import Tree

    store = registry.store
    m = registry.run_dir(run_id).read_fresh()
    wanted = [ref["blake3"] for ref in (m.get("logs") or {}).values() if isinstance(ref, dict) and ref.get("blake3")]
    tree_ref = (m.get("artifacts") or {}).get("tree")
    tree_here = not tree_ref or store.contains(tree_ref)
    if tree_ref and tree_here:
        wanted += sorted(Tree.load(store, tree_ref).addresses())
    if tree_here and all(store.contains(a) for a in wanted):
        return  # nothing missing: no pin, no batch, no request
    with store.pin() as pin, store.batch(pin) as batch:
        if not tree_here:
            with remote.open(blob_key(tree_ref)) as f:
                store.import_frame(tree_ref, f, batch)
            report["blobs_repaired"] += 1
            batch.sync()
            wanted += sorted(Tree.load(store, tree_ref).addresses())
        for address in dict.fromkeys(wanted):
            if not store.contains(address) and batch.pending(address) is None:
                with remote.open(blob_key(address)) as f:
                    report["bytes_received"] += store.import_frame(address, f, batch)
                report["blobs_repaired"] += 1
        batch.sync()  # inside the block: a failing sync discards the temps (see _pull_run)


SMALL_FRAME = (1 << 20) + 4096  # frames up to this size are fetched ahead, concurrently, into memory


class _Prefetch:
    """Frames fetched on worker threads, in order, at most ``2 * jobs`` ahead of the consumer
    (so at most that many small frames are held in memory). A frame larger than SMALL_FRAME
    is not kept: the consumer streams it itself."""

    def __init__(self, remote: Remote, addresses: list[str], jobs: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.remote = remote
        self.todo = list(addresses)
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="casruns-pull") if addresses else None
        self.ahead = 2 * jobs
        self.futures: dict[str, object] = {}
        self.next = 0
        self._fill()

    def _get(self, address: str) -> bytes | None:
        with self.remote.open(blob_key(address)) as f:
            data = f.read(SMALL_FRAME + 1)
        return data if len(data) <= SMALL_FRAME else None

    def _fill(self) -> None:
        while self.pool is not None and self.next < len(self.todo) and len(self.futures) < self.ahead:
            address = self.todo[self.next]
            self.futures[address] = self.pool.submit(self._get, address)
            self.next += 1

    def take(self, address: str) -> bytes | None:
        """The frame, if it was fetched ahead and is small; None: stream it."""
        future = self.futures.pop(address, None)
        if future is None:
            return None
        try:
            return future.result()
        finally:
            self._fill()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.futures.values():
                future.cancel()
            self.pool.shutdown(wait=True)


def _import(remote: Remote, store, batch, address: str, report: dict, fetched: _Prefetch | None = None) -> None:
    if batch.pending(address) is not None:
        return
    data = fetched.take(address) if fetched is not None else None
    if data is None and store.contains(address):
        try:
            store.import_frame(address, None, batch)  # pins and refreshes it
            report["blobs_present"] += 1
            return
        except BlobNotFound:
            pass  # a gc removed it between the look and the pin: fetch it like any other
    if data is not None:
        size = store.import_frame(address, io.BytesIO(data), batch)  # verified like a stream
        if size == 0:  # stored meanwhile by someone else: import_frame pinned it instead
            report["blobs_present"] += 1
            return
    else:
        with remote.open(blob_key(address)) as f:
            size = store.import_frame(address, f, batch)
    report["blobs_received"] += 1
    report["bytes_received"] += size


def compare(registry: "RegistryRoot", src: str, run_ids: list[str], *, read_data: bool = False, jobs: int = JOBS) -> list[dict]:
    """Differences between local runs and their archived copies (verify --against): manifest
    fields, each blob's presence and size and, with ``read_data``, each archived blob's content
    (streamed, decoded and re-hashed against its address; a blob shared by runs is read once)."""
    from concurrent.futures import ThreadPoolExecutor

    remote = open_remote(src, registry)
    _check_marker(remote)
    problems = []
    verdicts: dict[str, str | None] = {}  # address -> why its archived copy is bad (None: good)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="casruns-verify") as pool:
        for rid in run_ids:
            local = registry.run_dir(rid).read_fresh()
            try:
                other = remote_manifest(remote, rid)
            except RunNotFound:
                problems.append({"kind": "archive_missing", "run_id": rid, "message": f"{remote.url} has no copy of run {rid}"})
                continue
            except CasrunsError as e:  # unparsable, or not a regular file
                problems.append({"kind": "archive_corrupt", "run_id": rid, "message": f"archived manifest cannot be read: {e.message}"})
                continue
            for key in ("status", "logs", "artifacts", "exit_code"):
                if local.get(key) != other.get(key):
                    problems.append({"kind": "archive_differs", "run_id": rid, "message": f"archived copy differs in {key}"})
            to_read = []
            for address in _run_blobs(registry, local):
                try:
                    want = registry.store.frame_size(address)
                except BlobNotFound:
                    want = None
                got = remote.size(blob_key(address))
                if got is None:
                    problems.append({"kind": "archive_missing", "run_id": rid, "address": address, "message": f"archive lacks blob {address}"})
                elif want is not None and got != want:
                    problems.append({"kind": "archive_differs", "run_id": rid, "address": address, "message": f"archived blob {address} has {got} bytes, local {want}"})
                elif read_data:
                    to_read.append(address)
            unread = [a for a in to_read if a not in verdicts]
            verdicts.update(zip(unread, pool.map(lambda a: check_archived(remote, a), unread)))
            for address in to_read:
                if verdicts[address]:
                    problems.append({"kind": "archive_corrupt", "run_id": rid, "address": address, "message": f"the archived copy is bad: {verdicts[address]}"})
    return problems
