"""Archive remotes: where an archive's objects live and how to read and write them.

:class:`Remote` is what an archive backend must do (keys are relative POSIX paths);
:class:`LocalRemote` is a local or mounted directory written durably (temp, fsync, rename,
fsync dir; regular files only, never through a symlink); :class:`FsspecRemote` is anything
fsspec opens (S3 through s3fs, sftp, gcs), whose failures become ``archive_unavailable``.
Which one opens a URL is casruns/backends.py's table; what is stored is casruns/archive.py's.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import BinaryIO, NamedTuple

from . import faults, fsutil
from .errors import ArchiveUnavailable, BackendMissing, CasrunsError, RegistryError, RunNotFound, StrayFile, TooLarge
from .ids import is_run_id

CHUNK = 1 << 20
LOCK_NAME = ".cas-lock"  # a directory archive's compare-and-swap lock file
READ_BLOCK = 4 << 20  # an fsspec reader's block: what one open archived object may hold in memory


class Obj(NamedTuple):
    """One archived object as a listing shows it. ``mtime`` is the store's own clock (S3's
    LastModified, a file's mtime as the file server set it): the only clock the archive's gc
    compares (spec/archive-gc.md). ``version`` changes whenever the object is written again."""

    key: str
    size: int
    mtime: float
    version: str


class Remote:
    """What an archive backend must do. Keys are relative POSIX paths.

    ``conditional``: whether :meth:`put_if` and :meth:`delete_if` are atomic on this store
    (S3's If-None-Match/If-Match, a lock on a directory); where they are not, they check and
    then act, and callers that need more read back (spec/archive-gc.md, "Stores without
    conditional writes")."""

    url: str
    conditional = False

    def size(self, key: str) -> int | None: ...
    def put_file(self, local: str, key: str, size: int) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def list_runs(self) -> list[str]: ...
    def objects(self, prefix: str) -> list[Obj]:
        """Every object under ``prefix`` (a folder: ``gc/marks``), recursively, in one listing."""
        ...
    def delete(self, keys: list[str]) -> None:
        """Remove these objects; an absent one is not an error. Batched (S3: 1,000 a request)."""
        ...
    def put_if(self, data: bytes, key: str, version: str | None) -> str | None:
        """Write ``key`` only if it is still at ``version`` (None: only if absent). Returns the
        version written (taken atomically with the write where the store is conditional: S3's
        ETag in the PUT's answer, a stat under the directory's flock), or None if it was not."""
        ...
    def delete_if(self, key: str, version: str) -> bool:
        """Remove ``key`` only if it is still at ``version``. False if it changed or is gone."""
        ...

    def stat(self, key: str) -> Obj | None:
        """One object's listing entry (its store time and version), or None."""
        return next((o for o in self.objects(key) if o.key == key), None)

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

    conditional = True  # a check-then-write under the archive's flock

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

        evidence = key.startswith(("blobs/", "runs/"))  # the fault point stands for a blob or manifest upload

        def pieces():
            for chunk in chunks:
                yield chunk
                if evidence:
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

    def _version(self, st: os.stat_result) -> str:
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"  # every write renames a new inode in

    def objects(self, prefix: str) -> list[Obj]:
        out: list[Obj] = []
        top = self._path(prefix.strip("/"))

        def walk(path: str, key: str) -> None:
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                return
            for e in entries:
                if e.name.startswith(".tmp-") or e.name == LOCK_NAME:
                    continue  # a writer's temp (or a dead one's, until gc removes it), the CAS lock
                st = e.stat(follow_symlinks=False)
                sub = f"{key}/{e.name}" if key else e.name
                if stat.S_ISDIR(st.st_mode):
                    walk(e.path, sub)
                elif stat.S_ISREG(st.st_mode):
                    out.append(Obj(sub, st.st_size, st.st_mtime, self._version(st)))

        try:
            st = os.lstat(top)
        except (FileNotFoundError, NotADirectoryError):
            return out
        if stat.S_ISREG(st.st_mode):
            out.append(Obj(prefix.strip("/"), st.st_size, st.st_mtime, self._version(st)))
        elif stat.S_ISDIR(st.st_mode):
            walk(top, prefix.strip("/"))
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        dirs = fsutil.DirSync()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise fsutil.write_error(f"cannot remove {path}", e, path) from e
            if key.startswith("runs/") and key.count("/") == 2:
                try:
                    os.rmdir(os.path.dirname(path))  # the run's folder, now empty
                    dirs.add(os.path.join(self.root, "runs"))
                    continue
                except OSError:
                    pass
            dirs.add(os.path.dirname(path))
        dirs.sync()

    def _cas(self):
        """The archive's compare-and-swap lock (flock on ``<root>/.cas-lock``): held for one
        check-then-write of one object by every casruns that writes this directory."""
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            fsutil.ensure_dir(self.root)
            fd = fsutil.open_private(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

        return held()

    def _current(self, key: str) -> str | None:
        try:
            st = os.lstat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return self._version(st) if stat.S_ISREG(st.st_mode) else "stray"

    def put_if(self, data: bytes, key: str, version: str | None) -> str | None:
        with self._cas():
            current = self._current(key)
            if current == "stray":
                raise StrayFile(f"{self._path(key)} in the archive is not a regular file (a directory, symlink or FIFO); remove it", path=self._path(key))
            if current != version:
                return None
            self.put_bytes(data, key)
            return self._current(key)

    def delete_if(self, key: str, version: str) -> bool:
        with self._cas():
            if self._current(key) != version:
                return False
            self.delete([key])
            return True


class FsspecRemote(Remote):
    def __init__(self, url: str, storage_options: dict, extra: str = "archive") -> None:
        """``extra``: the casruns extra that installs this scheme's library (the backends table)."""
        try:
            import fsspec
        except ImportError:
            raise BackendMissing(f"archives at {url} need fsspec: pip install 'casruns[{extra}]'") from None
        scheme = url.split("://", 1)[0].lower()
        try:
            self.fs, self.base = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as e:
            raise BackendMissing(
                f"no backend for {scheme}:// archives is installed ({e}); install it with: pip install 'casruns[{extra}]'"
            ) from None
        self.url = url
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # filesystems rename and may hold FIFOs and symlinks; object stores have neither
        self.renames = protocol in ("file", "local", "sftp", "ssh")
        self.s3 = protocol in ("s3", "s3a")
        self.conditional = self.s3  # If-None-Match / If-Match on PUT and DELETE

    def _path(self, key: str) -> str:
        return f"{self.base.rstrip('/')}/{key}"

    def _s3(self, method: str, **kwargs):
        """One S3 call through s3fs's own (error-translating, retrying) request path."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def _unavailable(self, what: str, e: BaseException) -> ArchiveUnavailable:
        return ArchiveUnavailable(f"{self.url}: cannot {what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    def size(self, key: str) -> int | None:
        try:
            if self.s3:  # one HEAD: s3fs's info() follows a 404 with a listing (is it a folder?)
                bucket, k, _ = self.fs.split_path(self._path(key))
                return int(self._s3("head_object", Bucket=bucket, Key=k)["ContentLength"])
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

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        """One GET on an object store (s3fs's open() asks for the object's info first: two
        requests for every manifest read); a ranged GET of ``limit + 1`` bytes when limited."""
        if self.renames:
            return super().get_bytes(key, limit)
        path = self._path(key)
        if limit is None:
            data = self._reading(key, lambda: self.fs.cat_file(path))
        else:
            try:
                data = self._reading(key, lambda: self.fs.cat_file(path, start=0, end=limit + 1))
            except ArchiveUnavailable:
                if self.size(key) != 0:
                    raise
                data = b""  # S3 answers a range of an empty object with 416
        if limit is not None and len(data) > limit:
            raise TooLarge(f"{self.url}/{key} is larger than its limit of {limit} bytes")
        return data

    def _reading(self, key: str, fn):
        """``fn()``, with a missing object as run_not_found/blob_not_found and the backend's
        failures as archive_unavailable."""
        try:
            return fn()
        except FileNotFoundError:
            raise _missing(self.url, key) from None
        except Exception as e:
            if _backend_error(e):
                raise self._unavailable(f"read {key}", e) from e
            raise

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)

        def opened():
            if self.renames:  # a filesystem: open a regular file only (a FIFO would block the read)
                info = self.fs.info(path)
                if info.get("type") != "file" or info.get("islink"):
                    raise StrayFile(f"{self.url}: {key} is not a regular file", path=key)
            # reads are sequential: small blocks bound memory (s3fs reads ahead 50 MiB by default)
            return self.fs.open(path, "rb", block_size=READ_BLOCK)

        return self._reading(key, opened)

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

    def objects(self, prefix: str) -> list[Obj]:
        path = self._path(prefix.strip("/"))
        base = self._path("")
        try:
            self.fs.invalidate_cache()  # a listing is the store's truth, never a cached one
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:
            if _backend_error(e):
                raise self._unavailable(f"list {prefix}", e) from e
            raise
        out = []
        for name, info in found.items():
            if info.get("type") != "file" or info.get("islink"):
                continue
            key = name[len(base):] if name.startswith(base) else name.split(base.split("://")[-1], 1)[-1]
            want = prefix.strip("/")
            if key.startswith("tmp/") or (want and not (key == want or key.startswith(want + "/"))):
                continue
            when = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            mtime = when.timestamp() if hasattr(when, "timestamp") else float(when)
            size = int(info.get("size") or 0)
            out.append(Obj(key, size, mtime, str(info.get("ETag") or f"{size}-{mtime}")))
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._guarded(f"remove {len(keys)} objects", lambda: self._rm([self._path(k) for k in keys]))

    def _rm(self, paths: list[str]) -> None:
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for p in paths:  # one was gone already: remove the rest one by one
                try:
                    self.fs.rm_file(p)
                except FileNotFoundError:
                    pass
        self.fs.invalidate_cache()

    def _precondition(self, fn):
        """``fn()``'s answer, or None when the store refused it for a failed precondition."""
        try:
            return fn() or {}
        except FileExistsError:
            return None
        except OSError as e:
            if "pre-condition" in str(e) or "PreconditionFailed" in repr(e.__cause__):
                return None
            raise self._unavailable("write conditionally", e) from e
        finally:
            self.fs.invalidate_cache()

    def put_if(self, data: bytes, key: str, version: str | None) -> str | None:
        path = self._path(key)
        if self.s3:
            match = {"mode": "create"} if version is None else {"IfMatch": version}
            answer = self._precondition(lambda: self.fs.pipe_file(path, data, **match))
            if answer is None:
                return None
            etag = answer.get("ETag") if isinstance(answer, dict) else None
            if etag:
                return str(etag)  # the version this very PUT made, whatever came after it
            got = self.stat(key)
            return got.version if got else None
        current = self.stat(key)  # no conditional writes here: check, then write
        if (current.version if current else None) != version:
            return None
        self.put_bytes(data, key)
        got = self.stat(key)
        return got.version if got else None

    def delete_if(self, key: str, version: str) -> bool:
        if self.s3:
            bucket, k, _ = self.fs.split_path(self._path(key))
            try:
                return self._precondition(lambda: self._s3("delete_object", Bucket=bucket, Key=k, IfMatch=version)) is not None
            except ArchiveUnavailable as e:
                if "NoSuchKey" in str(e.__cause__) or isinstance(e.__cause__, FileNotFoundError):
                    return False
                raise
        current = self.stat(key)
        if current is None or current.version != version:
            return False
        self.delete([key])
        return True


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


def _no_space(e: BaseException) -> bool:
    """A full disk or quota anywhere in the chain of causes (fsutil wraps OSError in RegistryError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if fsutil.is_no_space(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
