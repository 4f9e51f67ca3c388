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
from typing import BinaryIO

from . import faults, fsutil
from .errors import ArchiveUnavailable, BackendMissing, CasrunsError, RegistryError, RunNotFound, StrayFile, TooLarge
from .ids import is_run_id

CHUNK = 1 << 20
READ_BLOCK = 4 << 20  # an fsspec reader's block: what one open archived object may hold in memory


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


def _no_space(e: BaseException) -> bool:
    """A full disk or quota anywhere in the chain of causes (fsutil wraps OSError in RegistryError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if fsutil.is_no_space(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
