"""The content-addressed blob store: blake3 addresses, zstd encoding, dedup, verified reads.

A blob's address is the blake3 hex digest of its *uncompressed* content. On disk a blob is
one zstd frame at ``blobs/<first 2 hex>/<remaining 62 hex>`` (spec/format.md, "Blobs").

Invariants this module keeps (and the contract tests in tests/test_store.py check against
both implementations):

* A blob appears under its address only complete and durable. Writers compress into a temp
  file under ``blobs/tmp/``, make it durable, then rename it to its address. A writer killed
  at any moment leaves at most a temp file, which gc removes after a grace period.
* Identical content is stored once. Putting content that is already present writes no blob
  but refreshes the existing blob's mtime: a gc that is deciding right now whether that blob
  is garbage uses a grace period on mtime, so a blob that was just "used" is kept.
* Reads re-hash what they decompress and raise IntegrityError on a mismatch. Streaming
  reads hold back the last chunk until the hash is checked, so a reader never receives the
  complete (wrong) content without an error.
* Memory stays bounded: puts and reads stream in 1 MiB chunks whatever the blob size.

Batches: :meth:`DiskStore.batch` writes temps without fsync and, at :meth:`Batch.sync`,
makes them all durable with one ``syncfs`` (or per-file fsync for a few), renames them and
syncs the directories. The rule the callers keep: a manifest that references a blob is
committed only after the batch holding that blob was synced.

Packs: a batch with many small blobs writes them into pack files (``blobs/packs/``, see
:mod:`casruns.packs`) instead of one file each. Readers look for a loose file first, then in
the packs' indexes, which each process loads lazily and refreshes on a miss (a pack that gc
rewrote has vanished; its live blobs are in a newer pack).

Strays (spec/format.md, "Strays"): every blob, pack, pin and temp is opened ``O_NONBLOCK|O_NOFOLLOW``
and checked to be a regular file (a loose blob through its shard directory's descriptor, so a
symlinked shard is not followed either); listings keep regular files and real directories only.
A FIFO, directory or symlink with a blob's or pack's name is therefore never waited on, followed
or taken for a blob; :meth:`DiskStore.iter_strays` lists them for verify.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import blake3
import zstandard

from . import fsutil, packs
from .errors import BlobNotFound, IntegrityError, InvalidAddress, RegistryError, StrayFile
from .ids import is_address, validate_address

CHUNK = 1 << 20
SMALL = 1 << 20  # content up to this size is hashed before it is compressed (cheap dedup)
LEVEL = 3  # zstd level 3: compresses log text ~4x; on random data zstd stores raw blocks (<0.1% overhead)
FEW = 8  # a batch with at most this many new blobs fsyncs them one by one instead of syncfs
PACK_TARGET = 16 << 20  # a pack is closed once its frames reach this size (a gc rewrite copies at most this)
PIN_SUFFIXES = (".pin", ".done")  # pin files gc reads: live or settled pins, and settled pins of casruns 0.1
# A directory of the store, opened without following a symlink (or waiting on a FIFO) in its place.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # a path through a missing name, a stray or a symlink


class BlobInfo(NamedTuple):
    address: str
    size: int  # uncompressed bytes
    stored_size: int  # bytes on disk (the zstd frame)
    existed: bool = False  # True when the put found the content already stored


class BlobStore(ABC):
    """The store interface: a disk and a memory implementation share one contract."""

    @abstractmethod
    def contains(self, address: str) -> bool: ...

    def put_bytes(self, data: bytes) -> BlobInfo:
        return self._put_bytes(data, None)

    def put_stream(self, stream: BinaryIO, size: int | None = None) -> BlobInfo:
        return self._put_stream(stream, size, None)

    def put_file(self, path: str | os.PathLike) -> BlobInfo:
        """Store a regular file's content (the file is opened without following a symlink)."""
        return self._put_file(path, None)

    @abstractmethod
    def _put_bytes(self, data: bytes, batch: "Batch | None") -> BlobInfo: ...

    @abstractmethod
    def _put_stream(self, stream: BinaryIO, size: int | None, batch: "Batch | None") -> BlobInfo: ...

    def _put_file(self, path: str | os.PathLike, batch: "Batch | None") -> BlobInfo:
        try:
            fd = fsutil.open_regular(path)  # a FIFO would block the read: a stray is refused
        except OSError as e:
            raise RegistryError(f"cannot read {path}: {e.strerror}", path=str(path)) from e
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= SMALL:
                return self._put_bytes(f.read(), batch)
            return self._put_stream(f, size, batch)

    def _commit_batch(self, temps: list[tuple[str, BlobInfo]], packs: list[tuple[str, str, dict]]) -> None:
        """Make a batch's pending blobs durable and visible (stores without temps: nothing)."""

    def _write_temp(self, payload: bytes, durable: bool) -> str:
        raise NotImplementedError

    def _new_pack(self):
        raise NotImplementedError

    @abstractmethod
    def iter_chunks(self, address: str) -> Iterator[bytes]:
        """Yield the blob's content; raises IntegrityError before the last chunk on mismatch."""

    def read_bytes(self, address: str, limit: int | None = None) -> bytes:
        """The whole (verified) content of a blob. With ``limit``, a blob that decompresses to
        more than ``limit`` bytes raises TooLarge while it is decompressed, never after: a small
        frame that inflates to gigabytes costs at most ``limit`` plus one chunk of memory."""
        if limit is None:
            return b"".join(self.iter_chunks(address))
        parts, got = [], 0
        for chunk in self.iter_chunks(address):
            got += len(chunk)
            if got > limit:
                from .errors import TooLarge

                raise TooLarge(f"blob {address} is larger than the limit of {limit} bytes for what it holds", address=address)
            parts.append(chunk)
        return b"".join(parts)

    @abstractmethod
    def stat(self, address: str) -> BlobInfo: ...

    @abstractmethod
    def iter_addresses(self) -> Iterator[str]: ...

    @abstractmethod
    def delete(self, address: str) -> bool: ...

    def copy_to(self, address: str, dest: str | os.PathLike, mode: int = fsutil.FILE_MODE) -> int:
        """Materialize a blob at ``dest``: written to a temp file, verified, then renamed.

        A corrupt blob therefore never appears at ``dest``. Returns the size written.
        """
        return fsutil.atomic_write_chunks(dest, self.iter_chunks(address), mode=mode)

    def batch(self, pin: "Pin | None" = None) -> "Batch":
        """A group of puts made durable together (see :class:`Batch`).

        With ``pin``, every address the batch uses is pinned first, so a concurrent gc keeps
        it until the pin is released (after the manifest that references it is committed).
        """
        return Batch(self, pin)

    def pin(self) -> "Pin":
        """A pin for an ingest (a no-op where no gc runs concurrently)."""
        return Pin(None)


class Batch:
    """Puts whose durability is settled once, by :meth:`sync`, before a manifest commit.

    Usable as a context manager: leaving the block normally syncs; leaving it with an
    exception discards the batch's temp files (nothing references them yet).

    On a store that packs, small new blobs are held in memory until the batch has more than
    ``FEW`` of them; from then on they go into pack files (spec/format.md, "Packs"). A batch
    with few small blobs writes them as loose files at :meth:`sync`.
    """

    def __init__(self, store: BlobStore, pin: "Pin | None" = None) -> None:
        self.store = store
        self.pin = pin
        self._pending: dict[str, BlobInfo] = {}  # every address this batch stores anew
        self._temps: list[tuple[str, BlobInfo]] = []  # loose blob temps, written, not synced
        self._small: list[tuple[str, bytes, BlobInfo]] = []  # packable frames held back
        self._pack = None  # the open packs.PackWriter
        self._packs: list[tuple[str, str, dict]] = []  # finished packs: (temp, name, entries)
        self.dirs = fsutil.DirSync()  # shards of dedup hits: their names must be durable too

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.sync()
        else:
            self.discard()

    def put_bytes(self, data: bytes) -> BlobInfo:
        return self.store._put_bytes(data, self)

    def put_stream(self, stream: BinaryIO, size: int | None = None) -> BlobInfo:
        return self.store._put_stream(stream, size, self)

    def put_file(self, path: str | os.PathLike) -> BlobInfo:
        return self.store._put_file(path, self)

    def pending(self, address: str) -> BlobInfo | None:
        return self._pending.get(address)

    def _add(self, address: str, tmp: str, info: BlobInfo) -> None:
        self._pending[address] = info
        self._temps.append((tmp, info))

    def _add_small(self, address: str, frame: bytes, info: BlobInfo) -> None:
        self._pending[address] = info
        if self._pack is None and not self._packs and len(self._small) < FEW:
            self._small.append((address, frame, info))
            return
        if self._pack is None:
            self._pack = self.store._new_pack()
            for held in self._small:
                self._pack.add(held[0], held[1], held[2].size)
            self._small.clear()
        self._pack.add(address, frame, info.size)
        if self._pack.offset >= PACK_TARGET or len(self._pack) >= packs.MAX_ENTRIES:
            self._finish_pack()

    def _finish_pack(self) -> None:
        name = self._pack.finish()  # on failure the writer stays ours, for discard() to remove
        self._packs.append((self._pack.path, name, self._pack.index()))
        self._pack = None

    def sync(self) -> None:
        if self._pack is not None:
            self._finish_pack()
        for address, frame, info in self._small:
            self._temps.append((self.store._write_temp(frame, durable=False), info))
        self._small.clear()
        if self._temps or self._packs:
            try:
                self.store._commit_batch(self._temps, self._packs)
            except BaseException:
                self.discard()  # the temps not yet renamed (a stray in the way, a full disk)
                raise
        self._temps, self._packs = [], []
        self._pending.clear()
        self.dirs.sync()

    def discard(self) -> None:
        for tmp in [t for t, _ in self._temps] + [t for t, _, _ in self._packs]:
            _unlink(tmp)
        if self._pack is not None:
            self._pack.abandon()
            self._pack = None
        self._temps, self._packs, self._small = [], [], []
        self._pending.clear()


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
            from . import locking

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


class _HashingReader:
    """A file-like wrapper that hashes and counts what zstd's copy loop reads through it."""

    def __init__(self, stream: BinaryIO, hasher) -> None:
        self.stream = stream
        self.hasher = hasher
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            self.hasher.update(data)
            self.size += len(data)
        return data


class DiskStore(BlobStore):
    """Blobs as zstd files under a directory (normally ``<registry>/blobs``)."""

    def __init__(
        self, path: str | os.PathLike, *, level: int = LEVEL, threads: int | None = None, packing: bool = True
    ) -> None:
        self.path = Path(path)
        self.tmp_dir = self.path / "tmp"
        self.packs_dir = self.path / "packs"
        self._root = str(self.path)
        self.level = level
        # Registry format 1 has no packs: a store of such a registry writes loose blobs only.
        self.packing = packing
        self._packs: dict[str, dict[str, packs.PackEntry]] = {}  # pack name -> its index
        self._where: dict[str, str] = {}  # address -> a pack holding it
        self.bad_packs: dict[str, str] = {}  # pack name -> why its index cannot be read
        self._index_lock = threading.Lock()  # guards reading and swapping the three fields above
        self._refresh_lock = threading.RLock()  # one refresh at a time
        self._packs_seen: tuple[int, int] | None = None  # (inode, mtime_ns) of packs/ at the last look
        self._packs_seen_settled = False  # ... and that look came well after that mtime
        # Large inputs compress on worker threads while this thread reads and hashes.
        self.threads = threads if threads is not None else min(os.cpu_count() or 1, 4)
        self._local = threading.local()
        self.pins_dir = self.path / "pins"
        self._share: _SharedSweep | None = None

    def pin(self) -> Pin:
        self._real_dir(self.pins_dir)
        return Pin(str(self.pins_dir / f"{os.getpid()}-{secrets.token_hex(8)}.pin"))

    def sweep_lock_path(self) -> Path:
        return self.path / "sweep.lock"

    def _sweep_shared(self) -> "_SharedSweep":
        """Shared hold of the sweep lock around "pin, then check" and around listings of
        ``blobs/packs/``: gc deletes under the exclusive hold, so it either sees our pin or we
        see the blob gone (and rewrite it), and a listing never overlaps a pack's deletion.
        Re-entrant and shared by the process' threads (one descriptor, counted holders)."""
        if self._share is None:
            if not self.path.is_dir():
                fsutil.ensure_dir(self.path)
            self._share = _SharedSweep(fsutil.open_lock_file(self.sweep_lock_path()))
        return self._share

    def exclusive(self):
        """The sweep lock held exclusively (gc's deletions, pack replacement). Never taken by a
        thread that holds it shared: flock would wait for ourselves."""
        from . import locking

        if not self.path.is_dir():
            fsutil.ensure_dir(self.path)
        return locking.FileLock(str(self.sweep_lock_path()))

    # -- paths -------------------------------------------------------------------------
    def path_for(self, address: str) -> Path:
        validate_address(address)
        return self.path / address[:2] / address[2:]

    def _loose(self, address: str) -> str:
        """``path_for`` as a string (pathlib costs ~15 µs a call on the ingest path)."""
        validate_address(address)
        return f"{self._root}/{address[:2]}/{address[2:]}"

    def _ensure_dirs(self, address: str) -> Path:
        final = self.path_for(address)
        self._real_dir(final.parent)
        return final

    def _new_temp(self) -> tuple[str, int]:
        self._real_dir(self.tmp_dir)
        tmp = str(self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.tmp")
        fd = fsutil.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        return tmp, fd

    def _cctx(self, threads: int) -> zstandard.ZstdCompressor:
        cache = self._local.__dict__.setdefault("cctx", {})
        c = cache.get(threads)
        if c is None:
            # 2 MiB jobs instead of zstd's default 8 MiB: measured peak RSS putting 1 GiB of
            # random data fell from 129 MiB to 51 MiB at the same speed (text: 1.4% larger).
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, threads=threads, job_size=2 << 20 if threads else 0, write_content_size=True
            )
            c = cache[threads] = zstandard.ZstdCompressor(compression_params=params)
        return c

    # -- queries -----------------------------------------------------------------------
    def contains(self, address: str) -> bool:
        return self._loose_stat(address) is not None or self._locate(address) is not None

    def stat(self, address: str) -> BlobInfo:
        p = self.path_for(address)
        fd = self._open_loose(address)
        if fd is None:
            loc = self._locate(address)
            if loc is None:
                raise self._missing(address)
            return BlobInfo(address, loc[1].size, loc[1].length)
        with os.fdopen(fd, "rb") as f:
            stored = os.fstat(f.fileno()).st_size
            header = f.read(18)
        try:
            size = zstandard.frame_content_size(header)
        except zstandard.ZstdError:
            raise IntegrityError(f"blob {address} is not a zstd frame: {p}", address=address) from None
        if size < 0:  # unknown content size (a streamed put of unknown length): count it
            size = sum(len(c) for c in self.iter_chunks(address))
        return BlobInfo(address, size, stored)

    def iter_addresses(self) -> Iterator[str]:
        """Every stored address, loose or packed, sorted, each once."""
        loose = list(self.iter_loose_addresses())
        self._refresh_packs()
        with self._index_lock:
            packed = set(self._where)
        yield from sorted(packed.union(loose))

    def iter_loose_addresses(self) -> Iterator[str]:
        """The loose blobs: regular files in real shard directories (strays are skipped)."""
        for shard in self._scan(self.path, _is_shard, stat.S_ISDIR)[0]:
            for name in self._scan(self.path / shard, _is_loose_name, stat.S_ISREG)[0]:
                yield shard + name

    # -- strays (spec/format.md, "Strays") ------------------------------------------------
    @staticmethod
    def _scan(directory: Path, named, is_kind) -> tuple[list[str], list[tuple[str, str]]]:
        """The entries of ``directory`` that ``named`` accepts, split by type, each sorted: names
        of the expected type (``is_kind`` of the mode, symlinks never followed), and (name,
        kind) of the strays. A missing directory, or a stray in its place, is empty."""
        good, strays = [], []
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if not named(entry.name):
                        continue
                    try:
                        # d_type answers without a stat on most filesystems; a stray costs an lstat
                        ok = entry.is_dir(follow_symlinks=False) if is_kind is stat.S_ISDIR else entry.is_file(follow_symlinks=False)
                        if not ok:
                            strays.append((entry.name, fsutil.kind_of(entry.stat(follow_symlinks=False).st_mode)))
                            continue
                    except FileNotFoundError:
                        continue  # gone meanwhile
                    good.append(entry.name)
        except OSError as e:
            if e.errno not in _ABSENT:
                raise
        return sorted(good), sorted(strays)

    def iter_strays(self) -> Iterator[tuple[str, str]]:
        """Every stray in the store, sorted: (its path relative to ``blobs/``, its kind).

        A stray is an entry with a name the store gives meaning to but of the wrong type: a
        shard, ``packs/``, ``pins/`` or ``tmp/`` that is not a real directory (a symlink to
        one included); a loose blob, pack, pin or temp that is not a regular file. Readers skip
        strays and writers never take one for a blob; only verify lists them.
        """
        special = {"packs": packs.is_pack_name, "pins": lambda n: n.endswith((*PIN_SUFFIXES, ".pin.new")), "tmp": lambda n: True}
        dirs, out = self._scan(self.path, lambda n: _is_shard(n) or n in special, stat.S_ISDIR)
        for name in dirs:
            named = special.get(name, _is_loose_name)
            out += [(f"{name}/{n}", kind) for n, kind in self._scan(self.path / name, named, stat.S_ISREG)[1]]
        yield from sorted(out)

    def loose_stray(self, address: str) -> tuple[str, str] | None:
        """The stray (path relative to ``blobs/``, kind) where ``address``'s loose file or its
        shard directory should be, or None."""
        validate_address(address)
        for rel, is_kind in ((address[:2], stat.S_ISDIR), (f"{address[:2]}/{address[2:]}", stat.S_ISREG)):
            try:
                mode = os.lstat(f"{self._root}/{rel}").st_mode
            except OSError:
                return None
            if not is_kind(mode):
                return rel, fsutil.kind_of(mode)
        return None

    def _missing(self, address: str) -> BlobNotFound:
        """The error for a blob that is not stored, naming a stray in its place if there is one."""
        stray = self.loose_stray(address)
        if stray is None:
            return BlobNotFound(f"blob {address} not found in {self.path}", address=address)
        path = f"{self.path}/{stray[0]}"
        what = {"fifo": "a FIFO", "symlink": "a symlink", "directory": "a directory", "file": "a file"}.get(stray[1], f"a {stray[1]}")
        return BlobNotFound(
            f"blob {address} is not stored: {path} is {what}, a stray that is never read (run casruns verify)",
            address=address,
            path=path,
        )

    def _real_dir(self, path: Path) -> None:
        """Make sure ``path`` is a directory of its own (created if missing; never a symlink)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            fsutil.ensure_dir(path)
            return
        if not stat.S_ISDIR(mode):
            raise StrayFile(
                f"{path} is a {fsutil.kind_of(mode).replace('_', ' ')}, not a directory: a stray (spec/format.md, \"Strays\"); remove it",
                path=str(path),
            )

    def _loose_stat(self, address: str) -> os.stat_result | None:
        """The loose blob's lstat if it is a regular file in a real shard directory; None if
        it is absent or a stray (never followed, never opened)."""
        path = self._loose(address)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and stat.S_ISDIR(os.lstat(path[:-63]).st_mode):
                return st
        except OSError as e:
            if e.errno not in _ABSENT:
                raise
        return None

    def _open_loose(self, address: str) -> int | None:
        """The loose blob opened for reading, or None if no regular file is there: absent, or
        a stray (a FIFO is not waited on, a symlink, even as its shard, is not followed)."""
        validate_address(address)
        try:
            shard = os.open(f"{self._root}/{address[:2]}", _DIR_FLAGS)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise
        try:
            return fsutil.open_regular(address[2:], dir_fd=shard)
        except (FileNotFoundError, StrayFile):
            return None
        finally:
            os.close(shard)

    def _store_error(self, address: str, final: Path, e: OSError) -> RegistryError:
        """A failed rename of a blob to its address: a stray directory there, or an I/O error."""
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):  # rename(2) onto a directory
            return StrayFile(
                f"cannot store blob {address}: {final} is a directory, a stray (spec/format.md, \"Strays\"); remove it",
                path=str(final),
            )
        return RegistryError(f"cannot store blob {address} at {final}: {e.strerror}", path=str(final))

    def iter_temp_files(self) -> Iterator[Path]:
        """The temps in ``blobs/tmp/``: regular files only (gc deletes these; it skips strays)."""
        yield from (self.tmp_dir / n for n in self._scan(self.tmp_dir, lambda n: True, stat.S_ISREG)[0])

    # -- reads -------------------------------------------------------------------------
    def iter_chunks(self, address: str) -> Iterator[bytes]:
        p = self.path_for(address)
        fd = self._open_loose(address)
        if fd is None:
            data = self._read_packed(address)  # whole and verified: packed blobs are small
            for i in range(0, len(data), CHUNK):
                yield data[i : i + CHUNK]
            return
        hasher = blake3.blake3()
        held: bytes | None = None
        with os.fdopen(fd, "rb") as f:
            try:
                for chunk in zstandard.ZstdDecompressor().read_to_iter(f, read_size=CHUNK, write_size=CHUNK):
                    if held is not None:
                        yield held
                    hasher.update(chunk)
                    held = chunk
            except zstandard.ZstdError as e:
                raise IntegrityError(f"blob {address} cannot be decoded ({e}): {p}", address=address) from None
        if hasher.hexdigest() != address:
            raise IntegrityError(
                f"blob {address} is corrupt: its content hashes to {hasher.hexdigest()}: {p}",
                address=address,
                path=str(p),
            )
        if held is not None:
            yield held

    # -- writes ------------------------------------------------------------------------
    def _existing(self, address: str, batch: Batch | None) -> BlobInfo | None:
        """The blob if already stored (refreshing its mtime) or pending in this batch."""
        if batch is not None:
            info = batch.pending(address)
            if info is not None:
                return info._replace(existed=True)
        final = self._loose(address)
        pin = batch.pin if batch is not None else None
        with self._sweep_shared():
            # Pin first, then check (a gc sweeping right now sees the pin, or has already
            # deleted the blob and we write it again).
            if pin is not None:
                pin.add(address)
            # A stray under the address (a FIFO, a directory, a symlink) is no blob: the write
            # that follows renames the new blob over it, or fails clearly (a directory).
            st = self._loose_stat(address)
            if st is not None:
                # Why touch as well: gc also keeps blobs whose mtime is within its grace
                # period, which protects puts made without a pin.
                try:
                    os.utime(final, follow_symlinks=False)
                except FileNotFoundError:
                    st = None  # quarantined a moment ago
            if st is not None:
                stored = st.st_size
                directory = os.path.dirname(final)
            else:
                # Only a pinned writer may rely on a packed copy: gc keeps a pack whose garbage
                # is pinned, but pack mtimes are never refreshed, so nothing protects an
                # unpinned one. A writer without a pin stores its own copy instead.
                if pin is None or pin.path is None:
                    return None
                stored = self._find_packed(address)
                if stored is None:
                    return None
                directory = self.packs_dir
        # The blob may have been renamed in a moment ago by a writer that has not yet synced
        # its directory: make the name durable before anyone commits a reference to it.
        if batch is not None:
            batch.dirs.add(directory)
        else:
            fsutil.fsync_dir(directory)
        return BlobInfo(address, -1, stored, True)

    def _put_bytes(self, data: bytes, batch: Batch | None) -> BlobInfo:
        data = bytes(data)
        address = blake3.blake3(data).hexdigest()
        found = self._existing(address, batch)
        if found is not None:
            return found._replace(size=len(data))
        threads = self.threads if len(data) >= 8 * CHUNK else 0
        payload = self._cctx(threads).compress(data)
        info = BlobInfo(address, len(data), len(payload))
        if batch is not None and self.packing and len(data) <= packs.MAX_BLOB:
            batch._add_small(address, payload, info)
            return info
        tmp = self._write_temp(payload, durable=batch is None)
        return self._finish(address, tmp, info, batch)

    def _write_temp(self, payload: bytes, durable: bool) -> str:
        tmp, fd = self._new_temp()
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                if durable:
                    out.flush()
                    os.fsync(out.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _new_pack(self) -> packs.PackWriter:
        tmp, fd = self._new_temp()
        return packs.PackWriter(fd, tmp)

    def _put_stream(self, stream: BinaryIO, size: int | None, batch: Batch | None) -> BlobInfo:
        hasher = blake3.blake3()
        reader = _HashingReader(stream, hasher)
        tmp, fd = self._new_temp()
        try:
            with os.fdopen(fd, "wb") as out:
                kwargs = {"read_size": CHUNK, "write_size": CHUNK}
                if size is not None:
                    kwargs["size"] = size
                try:
                    _, written = self._cctx(self.threads).copy_stream(reader, out, **kwargs)
                except zstandard.ZstdError as e:
                    # The declared size did not match what the stream yielded (a file that
                    # changed while being read): nothing was stored under any address.
                    raise RegistryError(f"cannot store stream: {e}") from None
                if batch is None:
                    out.flush()
                    os.fsync(out.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        address = hasher.hexdigest()
        found = self._existing(address, batch)
        if found is not None:
            _unlink(tmp)
            return found._replace(size=reader.size)
        return self._finish(address, tmp, BlobInfo(address, reader.size, written), batch)

    def _finish(self, address: str, tmp: str, info: BlobInfo, batch: Batch | None) -> BlobInfo:
        if batch is not None:
            batch._add(address, tmp, info)
            return info
        final = self._ensure_dirs(address)
        try:
            # rename over an identical blob a concurrent writer just stored is harmless, and
            # over a stray FIFO, file or symlink under the address replaces it.
            os.rename(tmp, final)
        except OSError as e:
            _unlink(tmp)
            raise self._store_error(address, final, e) from e
        fsutil.fsync_dir(final.parent)
        return info

    def import_frame(self, address: str, stream: BinaryIO | None, batch: Batch) -> int:
        """Take a stored blob (a zstd frame) from elsewhere, verified before it is accepted.

        The frame is decompressed and re-hashed as it arrives (a small one in memory, where
        it may join the batch's pack; a large one into a temp file); only if its content
        hashes to ``address`` does it join ``batch``. A tampered or truncated frame raises
        IntegrityError and leaves nothing behind. With ``stream=None`` the blob
        must already be here: it is pinned and refreshed. Returns the bytes received.
        """
        if stream is None:
            if self._existing(address, batch) is None:
                raise BlobNotFound(f"blob {address} not found in {self.path}", address=address)
            return 0
        validate_address(address)
        if self._existing(address, batch) is not None:
            return 0
        check = _FrameCheck(address)
        limit = packs.MAX_BLOB + 4096  # a frame this small is held in memory (and may join a pack)
        head = _read_up_to(stream, limit + 1)
        if len(head) <= limit:
            check.feed(head)
            size = check.finish()
            if self.packing and size <= packs.MAX_BLOB and _content_size(head) == size:
                batch._add_small(address, head, BlobInfo(address, size, len(head)))
            else:  # no content size in its header (a streamed put): loose
                self._finish(address, self._write_temp(head, durable=False), BlobInfo(address, size, len(head)), batch)
            return len(head)
        received = 0
        tmp, fd = self._new_temp()
        try:
            with os.fdopen(fd, "wb") as out:
                chunk = head
                while chunk:
                    out.write(chunk)
                    received += len(chunk)
                    check.feed(chunk)
                    chunk = stream.read(CHUNK)
            size = check.finish()
        except BaseException:
            _unlink(tmp)
            raise
        self._finish(address, tmp, BlobInfo(address, size, received), batch)
        return received

    def _commit_batch(self, temps: list[tuple[str, BlobInfo]], packs_: list[tuple[str, str, dict]]) -> None:
        """Make a batch durable: data first, then names, then the directories."""
        files = [t for t, _ in temps] + [t for t, _, _ in packs_]
        many = len(files) > FEW
        # 1. data: every temp file's content reaches stable storage before any rename.
        if many:
            try:
                fsutil.syncfs(self.path)
            except OSError:
                many = False
        if not many:
            for tmp in files:
                fd = fsutil.open_regular(tmp)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # 2. names.
        dirs = fsutil.DirSync()
        for tmp, info in temps:
            final = self._ensure_dirs(info.address)
            try:
                os.rename(tmp, final)
            except OSError as e:
                raise self._store_error(info.address, final, e) from e
            dirs.add(final.parent)
        if packs_:
            self._real_dir(self.packs_dir)
            for tmp, name, index in packs_:
                os.rename(tmp, self.packs_dir / name)
                self._add_pack(name, index)
            dirs.add(self.packs_dir)
        # 3. directories: one syncfs covers them all when there are many.
        if many:
            fsutil.syncfs(self.path)
        else:
            dirs.sync()

    # -- packs -------------------------------------------------------------------------
    def pack_path(self, name: str) -> Path:
        if not packs.is_pack_name(name):
            raise InvalidAddress(f"invalid pack name {name!r}")
        return self.packs_dir / name

    def pack_names(self) -> list[str]:
        """The readable packs, after a fresh look at ``blobs/packs/`` (see :attr:`bad_packs`)."""
        self._refresh_packs()
        with self._index_lock:
            return sorted(self._packs)

    def pack_readable(self, name: str) -> bool:
        """Whether the pack's index reads now (a fresh look at the file, not the cache)."""
        try:
            fd = self._open_pack(name)
        except FileNotFoundError:
            return False
        try:
            packs.read_index(fd, name)
            return True
        except packs.PackCorrupt:
            return False
        finally:
            os.close(fd)

    def pack_index(self, name: str) -> dict[str, packs.PackEntry]:
        """A pack's entries by address ({} for a pack not, or no longer, known)."""
        with self._index_lock:
            return dict(self._packs.get(name) or {})

    def _open_pack(self, name: str) -> int:
        """A pack opened for reading. FileNotFoundError if it is gone, or if a stray (not a
        regular file) has its name: a stray is never a pack, and readers then look again."""
        path = self.pack_path(name)
        try:
            return fsutil.open_regular(path)
        except StrayFile as e:
            raise FileNotFoundError(errno.ENOENT, e.message, str(path)) from None

    # -- pins (read by gc) -----------------------------------------------------------------
    def pin_files(self) -> list[str]:
        return pin_files(self.pins_dir)

    def _add_pack(self, name: str, index: dict) -> None:
        # in place: a refresh (which builds aside from these dicts) cannot run meanwhile
        with self._refresh_lock, self._index_lock:
            self._packs[name] = index
            for address in index:
                self._where.setdefault(address, name)

    def _refresh_packs(self, cheap: bool = False) -> None:
        """Bring the in-memory index in line with ``blobs/packs/``: load new packs, drop gone ones.

        The new index is built aside and swapped in whole, so a lookup in another thread sees
        the old one or the new one, never a mix. A pack listed but gone before it could be
        opened was deleted by a gc or quarantine that renamed its replacement in first: the
        directory is listed again, so a live blob is never reported missing for that.

        ``cheap``: skip the listing when the directory's mtime has not moved since the last
        look. Timestamps are coarse (a rename in the same tick goes unseen), so only dedup
        checks use it, where a miss costs a duplicate copy, never a wrong answer.
        """
        with self._refresh_lock:
            for _ in range(100):
                with self._sweep_shared():  # no pack is deleted while we list (gc deletes under the exclusive hold)
                    listed_at = time.time()
                    try:
                        st = os.lstat(self.packs_dir)
                        seen = (st.st_ino, st.st_mtime_ns) if stat.S_ISDIR(st.st_mode) else (0, 0)
                    except (FileNotFoundError, NotADirectoryError):
                        seen = (0, 0)
                    if seen == self._packs_seen and (cheap or self._packs_seen_settled):
                        return
                    # only regular files are packs: a FIFO would block the open, a directory
                    # fail every read; a symlink is never followed (nor packs/ as one)
                    names = set(self._scan(self.packs_dir, packs.is_pack_name, stat.S_ISREG)[0]) if seen != (0, 0) else set()
                # An unchanged mtime proves an unchanged directory only if our listing came
                # after the tick of that mtime (timestamps are coarse): allow a second.
                settled = listed_at - st.st_mtime > 1.0 if seen != (0, 0) else True
                with self._index_lock:
                    old_packs, old_bad = self._packs, self.bad_packs
                if names == old_packs.keys() | old_bad.keys():
                    self._packs_seen, self._packs_seen_settled = seen, settled
                    return
                new_packs = {n: old_packs[n] for n in names if n in old_packs}
                new_bad = {n: old_bad[n] for n in names if n in old_bad}
                vanished = False
                for name in sorted(names - new_packs.keys() - new_bad.keys()):
                    try:
                        fd = self._open_pack(name)
                    except FileNotFoundError:
                        vanished = True  # (or a stray now: the next listing skips it)
                        continue
                    try:
                        new_packs[name] = packs.read_index(fd, f"pack {name}")
                    except packs.PackCorrupt as e:
                        new_bad[name] = e.message
                    except OSError as e:  # EIO and the like: nothing is swapped in, retry later
                        raise RegistryError(f"cannot read pack {self.packs_dir / name}: {e.strerror}") from e
                    finally:
                        os.close(fd)
                where: dict[str, str] = {}
                for name in sorted(new_packs):
                    for address in new_packs[name]:
                        where.setdefault(address, name)
                with self._index_lock:
                    self._packs, self._where, self.bad_packs = new_packs, where, new_bad
                self._packs_seen, self._packs_seen_settled = seen, settled and not vanished
                if not vanished:
                    return

    def _locate(self, address: str, cheap: bool = False) -> tuple[str, packs.PackEntry] | None:
        validate_address(address)
        for attempt in range(2):
            with self._index_lock:
                name = self._where.get(address)
                index = self._packs.get(name) if name is not None else None
                if index is not None and address in index:
                    return name, index[address]
            if attempt:
                return None
            self._refresh_packs(cheap)
        return None

    def _find_packed(self, address: str) -> int | None:
        """The frame size of ``address`` in a pack that exists right now, or None.

        Called holding the sweep lock shared, after pinning: a pack that exists now cannot be
        deleted before gc has read our pin. Its mtime is not touched (a pack's mtime stays its
        creation time), so a hot blob does not keep a pack's garbage alive.
        """
        for _ in range(3):
            loc = self._locate(address, cheap=True)
            if loc is None:
                return None
            try:
                if stat.S_ISREG(os.lstat(self.packs_dir / loc[0]).st_mode):
                    return loc[1].length
            except FileNotFoundError:
                pass
            self._refresh_packs()  # rewritten by gc a moment ago: look again
        return None

    def read_frame(self, address: str) -> tuple[str, packs.PackEntry, bytes] | None:
        """The raw frame of a packed blob: (pack name, entry, frame); None if not packed."""
        for _ in range(3):
            loc = self._locate(address)
            if loc is None:
                return None
            name, entry = loc
            try:
                fd = self._open_pack(name)
            except FileNotFoundError:
                self._refresh_packs()
                continue
            try:
                return name, entry, packs.read_frame(fd, entry)
            except IntegrityError as e:
                raise IntegrityError(f"blob {address}: {e.message} in pack {name}", address=address) from None
            finally:
                os.close(fd)
        return None

    def _read_packed(self, address: str) -> bytes:
        got = self.read_frame(address)
        if got is None:
            raise self._missing(address)
        name, entry, frame = got
        where = f"pack {self.packs_dir / name}"
        try:
            if zstandard.frame_content_size(frame) != entry.size:
                raise IntegrityError(f"blob {address} is corrupt: its frame header disagrees with the index of {where}", address=address)
            data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(entry.size, 1))
        except zstandard.ZstdError as e:
            raise IntegrityError(f"blob {address} cannot be decoded ({e}): {where}", address=address) from None
        digest = blake3.blake3(data).hexdigest()
        if digest != address:
            raise IntegrityError(f"blob {address} is corrupt: its content hashes to {digest}: {where}", address=address)
        return data

    @staticmethod
    def check_frame(address: str, frame: bytes) -> int:
        """Verify a frame in memory (one whole frame, content hashing to ``address``); its size."""
        check = _FrameCheck(address)
        check.feed(frame)
        return check.finish()

    def frame_size(self, address: str) -> int:
        """The stored size of a blob's frame, without reading it (a packed one: from its index)."""
        st = self._loose_stat(address)
        if st is not None:
            return st.st_size
        loc = self._locate(address)
        if loc is None:
            raise self._missing(address)
        return loc[1].length

    def frame_source(self, address: str) -> tuple[str | None, bytes | None, int]:
        """Where a blob's stored frame is: (loose path, None, size) or (None, frame, size). A
        loose path is a regular file (a stray there is skipped); open it with O_NOFOLLOW."""
        st = self._loose_stat(address)
        if st is not None:
            return str(self.path_for(address)), None, st.st_size
        got = self.read_frame(address)
        if got is None:
            raise self._missing(address)
        return None, got[2], len(got[2])

    def write_pack(self, frames: Iterator[tuple[str, bytes, int]]) -> str | None:
        """A new durable pack of (address, frame, size); its name, or None if there were none."""
        writer = self._new_pack()
        try:
            for address, frame, size in frames:
                writer.add(address, frame, size)
            if not len(writer):
                writer.abandon()
                return None
            name = writer.finish()
            fd = fsutil.open_regular(writer.path)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._real_dir(self.packs_dir)
            os.rename(writer.path, self.packs_dir / name)
        except BaseException:
            writer.abandon()
            raise
        fsutil.fsync_dir(self.packs_dir)
        self._add_pack(name, writer.index())
        return name

    def rewrite_pack(self, name: str, keep: set[str]) -> str | None:
        """Copy the frames of ``keep`` from pack ``name`` into a new durable pack (not verified:
        a corrupt frame stays corrupt, and verify finds it). The old pack is left in place.
        Raises FileNotFoundError if the pack is gone (another process rewrote it)."""
        index = self.pack_index(name)
        fd = self._open_pack(name)
        try:
            frames = ((a, packs.read_frame(fd, index[a]), index[a].size) for a in sorted(keep) if a in index)
            return self.write_pack(frames)
        finally:
            os.close(fd)

    def merge_packs(self, names: list[str]) -> str | None:
        """Copy every entry of the packs ``names`` (each address once) into one new durable pack.

        Nothing is dropped, so deleting the merged packs afterwards loses no blob, pinned or
        not. Raises FileNotFoundError if one of them is gone (another process rewrote it).
        """
        seen: set[str] = set()

        def frames():
            for name in names:  # one open at a time: a group may hold thousands of tiny packs
                fd = self._open_pack(name)
                try:
                    index = packs.read_index(fd, name)  # from the file itself, not the cache
                    for address in sorted(index):
                        if address not in seen:
                            seen.add(address)
                            yield address, packs.read_frame(fd, index[address]), index[address].size
                finally:
                    os.close(fd)

        if sum(len(self.pack_index(n)) for n in names) > packs.MAX_ENTRIES:
            raise ValueError(f"a merge of {len(names)} packs would exceed {packs.MAX_ENTRIES} entries")
        return self.write_pack(frames())

    def delete_pack(self, name: str) -> bool:
        """Delete a pack whose blobs live on elsewhere (a durable rewrite), under the exclusive
        sweep lock so that no listing of packs/ overlaps the deletion."""
        with self.exclusive():
            try:
                os.unlink(self.pack_path(name))
            except FileNotFoundError:
                return False
        self._refresh_packs()
        return True

    def quarantine(self, address: str, qdir: str) -> bool:
        """Move a (corrupt) blob to ``qdir/<address>``: a loose file is renamed; a packed
        frame is copied out and its pack rewritten without it."""
        if self._loose_stat(address) is not None:  # (a stray is not moved: it is not the blob)
            try:
                os.rename(self.path_for(address), os.path.join(qdir, address))
                return True
            except FileNotFoundError:
                pass
        for _ in range(3):
            got = self.read_frame(address)
            if got is None:
                return False
            name, _, frame = got
            fsutil.atomic_write(os.path.join(qdir, address), frame)
            try:
                self._replace_pack(name, set(self.pack_index(name)) - {address})
                return True
            except FileNotFoundError:  # gc rewrote or merged that pack meanwhile: the frame moved
                self._refresh_packs()
        return False

    def _replace_pack(self, name: str, keep: set[str]) -> None:
        """Rewrite pack ``name`` with ``keep`` only, then delete it (never the new pack: names
        are content hashes, so a rewrite keeping everything in order has the same name)."""
        if self.rewrite_pack(name, keep) != name:
            self.delete_pack(name)

    def delete(self, address: str) -> bool:
        """Remove a blob (tests and tools; gc deletes under its own protocol). A stray under
        its address is not a blob and stays."""
        if self._loose_stat(address) is not None:
            try:
                os.unlink(self.path_for(address))
                return True
            except FileNotFoundError:
                pass
        loc = self._locate(address)
        if loc is None:
            return False
        self._replace_pack(loc[0], set(self.pack_index(loc[0])) - {address})
        return True


class _FrameCheck:
    """Decode and re-hash a frame from elsewhere as it arrives: exactly one frame, nothing
    after it, content hashing to the address. Fed in pieces of 512 input bytes, each of which
    expands to at most ~16 MiB (RLE blocks), so a hostile frame cannot blow up memory."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.hasher = blake3.blake3()
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        try:
            for i in range(0, len(chunk), 512):
                if self.dobj.eof:
                    raise IntegrityError(f"blob {self.address} has data after its zstd frame", address=self.address)
                out = self.dobj.decompress(chunk[i : i + 512])
                self.hasher.update(out)
                self.size += len(out)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"blob {self.address} cannot be decoded ({e})", address=self.address) from None

    def finish(self) -> int:
        """The content size, once the frame is known to be whole and to match its address."""
        if not self.dobj.eof:
            raise IntegrityError(f"blob {self.address} is truncated (the zstd frame does not end)", address=self.address)
        if self.dobj.unused_data:
            raise IntegrityError(f"blob {self.address} has data after its zstd frame", address=self.address)
        digest = self.hasher.hexdigest()
        if digest != self.address:
            raise IntegrityError(f"blob {self.address} is corrupt: its content hashes to {digest}", address=self.address)
        return self.size


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream (a socket may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(min(CHUNK, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _content_size(frame: bytes) -> int:
    try:
        return zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return -1


class _SharedSweep:
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


def pin_files(pins_dir: str | os.PathLike) -> list[str]:
    """The pin files of ``blobs/pins/`` (``*.pin``, and ``*.done`` left by casruns 0.1),
    sorted. Only regular files: a stray with a pin's name pins nothing and is never opened
    (spec/format.md, "Pins and the sweep lock"); nor is a ``pins`` that is not a directory."""
    try:
        if not stat.S_ISDIR(os.lstat(pins_dir).st_mode):
            return []
    except FileNotFoundError:
        return []
    names = DiskStore._scan(Path(pins_dir), lambda n: n.endswith(PIN_SUFFIXES), stat.S_ISREG)[0]
    return [os.path.join(pins_dir, n) for n in names]


def pin_settled(path: str | os.PathLike) -> bool:
    """True unless a live writer holds the pin's flock (a ``*.pin`` is created locked and the
    lock freed when the pin settles). A pin that is gone, or a stray, is settled."""
    from . import locking

    return not locking.is_held(path)


PIN_MAX = 64 << 20  # bytes: a pin of a million addresses; a larger one stops gc (RegistryError)


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


def _is_shard(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _is_loose_name(name: str) -> bool:
    return len(name) == 62 and is_address("00" + name)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class MemoryStore(BlobStore):
    """An in-memory store with the same contract (tests, embedders, dry runs)."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        self.touched: dict[str, int] = {}  # address -> number of dedup hits (the mtime analogue)

    def contains(self, address: str) -> bool:
        return validate_address(address) in self._blobs

    def _put_bytes(self, data: bytes, batch: Batch | None) -> BlobInfo:
        data = bytes(data)
        address = blake3.blake3(data).hexdigest()
        with self._lock:
            if address in self._blobs:
                self.touched[address] = self.touched.get(address, 0) + 1
                return BlobInfo(address, len(data), len(self._blobs[address][0]), True)
            payload = zstandard.ZstdCompressor(level=LEVEL).compress(data)
            self._blobs[address] = (payload, len(data))
            return BlobInfo(address, len(data), len(payload))

    def _put_stream(self, stream: BinaryIO, size: int | None, batch: Batch | None) -> BlobInfo:
        parts = []
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            parts.append(chunk)
        return self._put_bytes(b"".join(parts), batch)

    def iter_chunks(self, address: str) -> Iterator[bytes]:
        try:
            payload, _ = self._blobs[validate_address(address)]
        except KeyError:
            raise BlobNotFound(f"blob {address} not found in memory store", address=address) from None
        try:
            data = zstandard.ZstdDecompressor().decompress(payload)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"blob {address} cannot be decoded ({e})", address=address) from None
        if blake3.blake3(data).hexdigest() != address:
            raise IntegrityError(f"blob {address} is corrupt", address=address)
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]

    def stat(self, address: str) -> BlobInfo:
        try:
            payload, size = self._blobs[validate_address(address)]
        except KeyError:
            raise BlobNotFound(f"blob {address} not found in memory store", address=address) from None
        return BlobInfo(address, size, len(payload))

    def iter_addresses(self) -> Iterator[str]:
        yield from sorted(self._blobs)

    def delete(self, address: str) -> bool:
        with self._lock:
            return self._blobs.pop(validate_address(address), None) is not None

    def corrupt(self, address: str) -> None:
        """Flip one byte of a stored blob (for tests of the integrity check)."""
        payload, size = self._blobs[address]
        b = bytearray(payload)
        b[len(b) // 2] ^= 0x01
        self._blobs[address] = (bytes(b), size)
