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
import stat
import secrets
import threading
from typing import TYPE_CHECKING, BinaryIO

from . import faults, fsutil
from . import manifest as mf
from .errors import (
    BackendMissing, BlobNotFound, CasrunsError, CorruptManifest, IntegrityError, InvalidInput, InvalidRunId, NoSpace,
    ArchiveUnavailable, RegistryError, RunNotFound, StrayFile, TooLarge, UnsupportedFormat,
)
from .ids import is_run_id, validate_run_id

if TYPE_CHECKING:
    from .registry import Registry

MARKER = "casruns-archive.toml"
FORMAT = "casruns-archive"
VERSION = 1
CHUNK = 1 << 20
READ_BLOCK = 4 << 20  # an fsspec reader's block: what one open archived object may hold in memory
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "sftp": "sftp", "ssh": "sftp"}


MARKER_MAX = 64 * 1024  # bytes: the marker is a few lines


def blob_key(address: str) -> str:
    from .layout import loose_name  # the store's layout: archives keep it (validates the address)

    return f"blobs/{loose_name(address)}"


def manifest_key(run_id: str) -> str:
    return f"runs/{validate_run_id(run_id)}/manifest.toml"


class Remote:
    """What an archive backend must do. Keys are relative POSIX paths."""

    url: str

    def size(self, key: str) -> int | None: ...
    def put_file(self, local: str, key: str, size: int) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def list_runs(self) -> list[str]: ...

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """An object's bytes; with ``limit``, TooLarge once more than ``limit`` bytes arrived
        (a 3 GiB sparse "manifest" or a marker linked to /dev/zero never fills memory)."""
        with self.open(key) as f:
            if limit is None:
                return f.read()
            data = f.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"{self.url}/{key} is larger than its limit of {limit} bytes")
        return data


class LocalRemote(Remote):
    """A local or mounted directory, written durably: temp, fsync, rename, fsync dir."""

    def __init__(self, path: str) -> None:
        self.url = self.root = os.path.abspath(path)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def size(self, key: str) -> int | None:
        """The size of a regular file at ``key``; None for none, or for a symlink or other stray
        (a push then replaces it: rename replaces the link itself, never its target)."""
        try:
            st = os.lstat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def _real_dir(self, key: str) -> str:
        """The directory that will hold ``key``, created as needed, every component below the
        root a real directory: a symlinked ``blobs/ab`` in the archive is refused, never written
        through (it could lead anywhere)."""
        path = self.root
        fsutil.ensure_dir(path)  # the root itself may be reached through a link the user chose
        for part in key.split("/")[:-1]:
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                fsutil.ensure_dir(path)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise StrayFile(f"{path} in the archive is not a directory (a symlink or a file); refusing to write through it", path=path)
        return path

    def _write(self, key: str, chunks) -> None:
        target = self._path(key)
        self._real_dir(key)

        def pieces():
            for chunk in chunks:
                yield chunk
                faults.point("archive_push_mid_object")

        fsutil.atomic_write_chunks(target, pieces())

    def put_file(self, local: str, key: str, size: int) -> None:
        with open(local, "rb") as src:
            self._write(key, iter(lambda: src.read(CHUNK), b""))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._write(key, (data,))

    def open(self, key: str) -> BinaryIO:
        """A regular file only: a FIFO or a symlink in the archive is refused (StrayFile), never
        waited on or followed."""
        try:
            return os.fdopen(fsutil.open_regular(self._path(key)), "rb")
        except FileNotFoundError:
            raise _missing(self.url, key) from None

    def list_runs(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.root, "runs"))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_run_id(n) and os.path.isfile(os.path.join(self.root, "runs", n, "manifest.toml")))


class FsspecRemote(Remote):
    def __init__(self, url: str, storage_options: dict) -> None:
        try:
            import fsspec
        except ImportError:
            raise BackendMissing(f"archives at {url} need fsspec: pip install 'casruns[archive]'") from None
        scheme = url.split("://", 1)[0].lower()
        try:
            self.fs, self.base = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as e:
            extra = EXTRAS.get(scheme, "archive")
            raise BackendMissing(
                f"no backend for {scheme}:// archives is installed ({e}); install it with: pip install 'casruns[{extra}]'"
            ) from None
        self.url = url
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # filesystems rename and may hold FIFOs and symlinks; object stores have neither
        self.renames = protocol in ("file", "local", "sftp", "ssh")

    def _path(self, key: str) -> str:
        return f"{self.base.rstrip('/')}/{key}"

    def _unavailable(self, what: str, e: BaseException) -> ArchiveUnavailable:
        return ArchiveUnavailable(f"{self.url}: cannot {what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self._path(key))["size"])
        except FileNotFoundError:
            return None
        except Exception as e:
            if _backend_error(e):
                # "absent" would be a lie here: a marker check would call a live archive no archive
                raise self._unavailable(f"look up {key}", e) from e
            raise

    def _commit(self, upload, key: str, size: int) -> None:
        target = self._path(key)
        if self.renames:
            tmp = self._path(f"tmp/{secrets.token_hex(8)}")
            self.fs.makedirs(self._path("tmp"), exist_ok=True)
            upload(tmp)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(tmp, target)
        else:
            upload(target)  # a PUT is atomic: the object appears whole or not at all
        got = self.size(key)
        if got != size:
            raise RegistryError(f"{self.url}: uploaded {key} has {got} bytes, expected {size}")

    def put_file(self, local: str, key: str, size: int) -> None:
        self._guarded(f"write {key}", lambda: self._commit(lambda path: self.fs.put_file(local, path), key, size))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._guarded(f"write {key}", lambda: self._commit(lambda path: self.fs.pipe_file(path, data), key, len(data)))

    def _guarded(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            if _backend_error(e) and not _no_space(e):
                raise self._unavailable(what, e) from e
            raise

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            if self.renames:  # a filesystem: open a regular file only (a FIFO would block the read)
                info = self.fs.info(path)
                if info.get("type") != "file" or info.get("islink"):
                    raise StrayFile(f"{self.url}: {key} is not a regular file", path=key)
            # reads are sequential: small blocks bound memory (s3fs reads ahead 50 MiB by default)
            return self.fs.open(path, "rb", block_size=READ_BLOCK)
        except FileNotFoundError:
            raise _missing(self.url, key) from None
        except Exception as e:
            if _backend_error(e):
                raise self._unavailable(f"read {key}", e) from e
            raise

    def list_runs(self) -> list[str]:
        try:
            entries = self.fs.ls(self._path("runs"), detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            if _backend_error(e):
                raise self._unavailable("list runs", e) from e
            raise
        out = []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            if not is_run_id(name):
                continue
            if self.size(f"runs/{name}/manifest.toml") is not None:
                out.append(name)
        return sorted(out)


_BACKENDS = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "paramiko", "urllib3", "requests"}


def _backend_error(e: BaseException) -> bool:
    """An error of the archive's backend (network, credentials, the service), as opposed to a
    bug of ours: OSErrors and the exception families of the libraries behind fsspec."""
    if isinstance(e, CasrunsError):
        return False
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return True
    return type(e).__module__.split(".", 1)[0] in _BACKENDS


def _missing(url: str, key: str) -> CasrunsError:
    from .errors import BlobNotFound

    if key.startswith("blobs/"):
        return BlobNotFound(f"{url}: the archive has no blob {key[6:8]}{key[9:]}")
    return RunNotFound(f"{url}: no {key}")


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


def open_remote(url: str, registry: "Registry") -> Remote:
    if "://" not in url or url.startswith("file://"):
        return LocalRemote(url[len("file://") :] if url.startswith("file://") else url)
    opts: dict = {}
    scheme = url.split("://", 1)[0].lower()
    cfg = (registry.config.raw.get("archive") or {}) if registry._check_format() else {}
    if scheme in ("s3", "s3a"):
        endpoint = cfg.get("endpoint_url") or os.environ.get("CASRUNS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if cfg.get("region"):
            opts["client_kwargs"] = {"region_name": cfg["region"]}
    return FsspecRemote(url, opts)


def _ensure_marker(remote: Remote) -> None:
    if remote.size(MARKER) is None:
        remote.put_bytes(f'format = "{FORMAT}"\nversion = {VERSION}\n'.encode(), MARKER)
        return
    _check_marker(remote)


def _run_blobs(registry: "Registry", m: dict) -> list[str]:
    """A run's blobs in push order: artifact files and logs, then the tree (the manifest last)."""
    from .tree import Tree

    out: list[str] = []
    tree_ref = (m.get("artifacts") or {}).get("tree")
    if tree_ref:
        out.extend(sorted(Tree.load(registry.store, tree_ref).addresses()))
    for ref in (m.get("logs") or {}).values():
        if isinstance(ref, dict) and ref.get("blake3"):
            out.append(ref["blake3"])
    if tree_ref:
        out.append(tree_ref)
    return list(dict.fromkeys(out))


JOBS = 8  # concurrent requests: an object store is latency-bound (~19 requests a run, one at a time)


def _no_space(e: BaseException) -> bool:
    """A full disk or quota anywhere in the chain of causes (fsutil wraps OSError in RegistryError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if fsutil.is_no_space(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


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


def push(
    registry: "Registry", dest: str, run_ids: list[str] | None, *, promoted: bool = False, progress=None, jobs: int = JOBS,
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
        ids += [r["run_id"] for r in registry.list(promoted=True) if r["run_id"] not in ids]
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
        "bytes_sent": 0, "bytes_logical": 0, "blobs_verified": 0, "blobs_replaced": 0,
    }
    store = registry.store
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
        if not there:
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
            report["bytes_logical"] += size
            report["blobs_verified"] += verified
            if there:
                report["blobs_skipped"] += 1
                return
            report["blobs_replaced"] += got is not None  # a wrong size, or (verified) wrong content
            report["blobs_sent"] += 1
            report["bytes_sent"] += size
        faults.point("archive_push_blob")  # archive_push_blob=kill@N: killed after the N-th blob sent

    rid = None
    try:
        _ensure_marker(remote)
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="casruns-push") as pool:
            for i, (rid, m) in enumerate(manifests.items()):
                if progress:
                    progress("pushing runs", i + 1, len(manifests))
                todo = []
                for address in _run_blobs(registry, m):
                    if address in present:
                        report["bytes_logical"] += store.frame_size(address)
                        report["blobs_skipped"] += 1
                    else:
                        todo.append(address)
                # every blob of the run is in the archive before its manifest is written
                futures = [pool.submit(send, rid, a) for a in todo]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()  # the first failure ends the push: send nothing more
                    raise
                with open(registry.run_dir(rid).manifest_path, "rb") as f:
                    data = f.read()
                key = manifest_key(rid)
                if remote.size(key) != len(data) or remote.get_bytes(key) != data:
                    remote.put_bytes(data, key)  # last: the run's commit point
                report["runs"] += 1
    except Exception as e:
        where = f"of the archive {remote.url}" + (f" while pushing run {rid}" if rid else "")
        _raise_interrupted(e, report, where, f"{report['runs']} runs were pushed whole")
    return report


def remote_manifest(remote: Remote, run_id: str) -> dict:
    m = mf.loads(remote.get_bytes(manifest_key(run_id), limit=mf.MANIFEST_LIMIT), f"{remote.url}/{manifest_key(run_id)}")
    if m["run_id"] != run_id:
        raise RegistryError(f"{remote.url}: manifest of {run_id} names run {m['run_id']}")
    return m


def list_archive(registry: "Registry", src: str) -> dict:
    from .record import build

    remote = open_remote(src, registry)
    _check_marker(remote)
    runs, errors = [], []
    for rid in remote.list_runs():
        try:
            m = remote_manifest(remote, rid)
            r = build(m, registry.config)
        except (CorruptManifest, UnsupportedFormat, RunNotFound, InvalidRunId) as e:
            errors.append({"run_id": rid, "code": e.code, "message": e.message})  # hides only that run
            continue
        runs.append({"run_id": rid, "status": m["status"], "promoted": r["retention"]["promoted"], "created_at": m.get("created_at"), "labels": r["labels"]})
    out = {"schema": "casruns/archive-list/v1", "src": remote.url, "runs": runs}
    if errors:
        out["errors"] = errors
    return out


def pull(registry: "Registry", src: str, run_ids: list[str] | None, *, progress=None, jobs: int = JOBS) -> dict:
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
        registry._ensure()
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


def _pull_run(registry: "Registry", remote: Remote, rid: str, report: dict, jobs: int) -> None:
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


def _redact_pulled(registry: "Registry", m: dict) -> dict:
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


def _repair(registry: "Registry", remote: Remote, run_id: str, report: dict) -> None:
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


def compare(registry: "Registry", src: str, run_ids: list[str], *, read_data: bool = False, jobs: int = JOBS) -> list[dict]:
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
