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

Around it, one module per concept: :mod:`casruns.batch` (what a batch holds until it is synced;
the write order rule), :mod:`casruns.pins` (the pin protocol and the sweep lock, writer and
reader), :mod:`casruns.packset` (the packs of ``blobs/packs/``: index cache and maintenance),
:mod:`casruns.packs` (one pack file's format), :mod:`casruns.layout` (directory names, typed
listings, strays), :mod:`casruns.frames` (checking a frame read whole or from elsewhere),
:mod:`casruns.memstore` (the in-memory implementation). This module holds the interface and
DiskStore's read and put paths: the one place that decides what a put writes and where.

Packs: a batch with many small blobs writes them into pack files (``blobs/packs/``) instead of
one file each. Readers look for a loose file first, then in the packs' indexes.

Strays (spec/format.md, "Strays"): every blob, pack, pin and temp is opened ``O_NONBLOCK|O_NOFOLLOW``
and checked to be a regular file (a loose blob through its shard directory's descriptor, so a
symlinked shard is not followed either); listings keep regular files and real directories only.
A FIFO, directory or symlink with a blob's or pack's name is therefore never waited on, followed
or taken for a blob; :meth:`DiskStore.iter_strays` lists them for verify.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import blake3
import zstandard

from . import frames, fsutil, layout, packs
from .batch import Batch, commit_in_order
from .blobstore import BlobInfo, BlobStore, _HashingReader  # noqa: F401 - BlobStore's interface, re-exported
from .errors import BlobNotFound, IntegrityError, RegistryError, StrayFile
from .ids import validate_address
from .layout import ABSENT as _ABSENT, DIR_FLAGS as _DIR_FLAGS
from .packset import PackSet
from .pins import Pin, SharedSweep, SweepLock, live_addresses, pin_files

CHUNK = 1 << 20
from .blobstore import SMALL  # noqa: F401 - re-exported: content up to this size is hashed before it is compressed
LEVEL = 3  # zstd level 3: compresses log text ~4x; on random data zstd stores raw blocks (<0.1% overhead)
PACK_TARGET = 16 << 20  # a pack is closed once its frames reach this size (a gc rewrite copies at most this)


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
        self.pins_dir = self.path / "pins"
        self.sweep = SweepLock(self.path)
        self.packset = PackSet(self.packs_dir, self.sweep.shared, self.sweep.exclusive, self._new_pack)
        # Large inputs compress on worker threads while this thread reads and hashes.
        self.threads = threads if threads is not None else min(os.cpu_count() or 1, 4)
        self._local = threading.local()

    def pin(self) -> Pin:
        self._real_dir(self.pins_dir)
        return Pin(str(self.pins_dir / f"{os.getpid()}-{secrets.token_hex(8)}.pin"))

    def pinned(self) -> set[str]:
        return live_addresses(self.pins_dir)

    def pin_files(self) -> list[str]:
        """The pin files of ``blobs/pins/`` (see :func:`casruns.pins.pin_files`)."""
        return pin_files(self.pins_dir)

    # -- the sweep lock (casruns.pins.SweepLock) -------------------------------------------
    def sweep_lock_path(self) -> Path:
        return self.sweep.path

    def _sweep_shared(self) -> SharedSweep:
        return self.sweep.shared()

    def exclusive(self):
        return self.sweep.exclusive()

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
        return self._loose_stat(address) is not None or self.packset.locate(address) is not None

    def stat(self, address: str) -> BlobInfo:
        p = self.path_for(address)
        fd = self._open_loose(address)
        if fd is None:
            loc = self.packset.locate(address)
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
        yield from sorted(self.packset.addresses().union(loose))

    def iter_loose_addresses(self) -> Iterator[str]:
        """The loose blobs: regular files in real shard directories (strays are skipped)."""
        for shard in layout.scan(self.path, layout.is_shard, stat.S_ISDIR)[0]:
            for name in layout.scan(self.path / shard, layout.is_loose_name, stat.S_ISREG)[0]:
                yield shard + name

    # -- strays (spec/format.md, "Strays"; casruns.layout) -------------------------------
    def iter_strays(self) -> Iterator[tuple[str, str]]:
        """Every stray in the store, sorted: (its path relative to ``blobs/``, its kind)."""
        return layout.iter_strays(self.path)

    def loose_stray(self, address: str) -> tuple[str, str] | None:
        """The stray (path relative to ``blobs/``, kind) where ``address``'s loose file or its
        shard directory should be, or None."""
        return layout.loose_stray(self._root, address)

    def _missing(self, address: str) -> BlobNotFound:
        """The error for a blob that is not stored, naming a stray in its place if there is one."""
        return layout.missing_error(self._root, address)

    _real_dir = staticmethod(layout.real_dir)

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
        yield from (self.tmp_dir / n for n in layout.scan(self.tmp_dir, lambda n: True, stat.S_ISREG)[0])

    def remove_temp(self, path: Path) -> None:
        """Delete a temp of ``blobs/tmp/`` (gc: its writer is dead and it is old)."""
        path.unlink(missing_ok=True)

    def remove_loose(self, address: str) -> bool:
        """Delete a loose blob's file; False if it was already gone. Only gc calls this,
        holding the sweep lock exclusively after reading the pins (spec: "Garbage collection")."""
        return layout.unlink(self.path_for(address))

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
            # exactly one frame: bytes after it make the file something else than the blob
            try:
                whole = frames.frame_end(f.fileno()) == os.fstat(f.fileno()).st_size
            except (ValueError, zstandard.ZstdError, OSError):
                whole = False
            if not whole:
                raise IntegrityError(f"blob {address} has data after its zstd frame: {p}", address=address, path=str(p))
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
                stored = self.packset.find(address)
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
            layout.unlink_quiet(tmp)
            raise
        return tmp

    def _drop_temp(self, tmp: str) -> None:
        layout.unlink_quiet(tmp)

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
            layout.unlink_quiet(tmp)
            raise
        address = hasher.hexdigest()
        found = self._existing(address, batch)
        if found is not None:
            layout.unlink_quiet(tmp)
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
            layout.unlink_quiet(tmp)
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
        check = frames.FrameCheck(address)
        limit = packs.MAX_BLOB + 4096  # a frame this small is held in memory (and may join a pack)
        head = frames.read_up_to(stream, limit + 1)
        if len(head) <= limit:
            check.feed(head)
            size = check.finish()
            if self.packing and size <= packs.MAX_BLOB and frames.content_size(head) == size:
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
            layout.unlink_quiet(tmp)
            raise
        self._finish(address, tmp, BlobInfo(address, size, received), batch)
        return received

    def _commit_batch(self, temps: list[tuple[str, BlobInfo]], packs_: list[tuple[str, str, dict]]) -> None:
        commit_in_order(self.path, temps, packs_, self._place_loose, self._place_pack)

    def _place_loose(self, tmp: str, info: BlobInfo) -> Path:
        """Rename a batch's synced temp to its address; the directory to sync."""
        final = self._ensure_dirs(info.address)
        try:
            os.rename(tmp, final)
        except OSError as e:
            raise self._store_error(info.address, final, e) from e
        return final.parent

    def _place_pack(self, tmp: str, name: str, index: dict) -> Path:
        """Rename a batch's synced pack temp to its name, and index it; the directory to sync."""
        self._real_dir(self.packs_dir)
        os.rename(tmp, self.packs_dir / name)
        self.packset.add(name, index)
        return self.packs_dir

    def _read_packed(self, address: str) -> bytes:
        got = self.read_frame(address)
        if got is None:
            raise self._missing(address)
        name, entry, frame = got
        return frames.decode_packed(address, entry.size, frame, f"pack {self.packs_dir / name}")

    check_frame = staticmethod(frames.check_frame)

    def frame_size(self, address: str) -> int:
        """The stored size of a blob's frame, without reading it (a packed one: from its index)."""
        st = self._loose_stat(address)
        if st is not None:
            return st.st_size
        loc = self.packset.locate(address)
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


    # -- the pack set (casruns.packset): what gc, verify and archive ask of it -------------
    def _pack_full(self, writer: packs.PackWriter) -> bool:
        """Whether a batch's open pack is to be closed (and another one begun)."""
        return writer.offset >= PACK_TARGET or len(writer) >= packs.MAX_ENTRIES

    # What gc, verify and archive (and tests) call, answered by the pack set:
    bad_packs = property(lambda self: self.packset.bad, doc="pack name -> why its index cannot be read (at the last look)")
    pack_path = property(lambda self: self.packset.path)
    pack_names = property(lambda self: self.packset.names)  # a fresh look at blobs/packs/
    pack_readable = property(lambda self: self.packset.readable)
    pack_index = property(lambda self: self.packset.index)
    read_frame = property(lambda self: self.packset.read_frame)
    write_pack = property(lambda self: self.packset.write)
    rewrite_pack = property(lambda self: self.packset.rewrite)
    merge_packs = property(lambda self: self.packset.merge)
    delete_pack = property(lambda self: self.packset.delete)
    unlink_pack = property(lambda self: self.packset.unlink)  # gc, holding the sweep lock exclusively
    quarantine_pack = property(lambda self: self.packset.quarantine_pack)

    def merge_small_packs(self, *, below: int, at_least: int, group: int, progress=None, merged_hook=None) -> int:
        """Merge small packs (gc's thresholds) into packs of up to PACK_TARGET bytes; the number
        of packs merged away (see PackSet.merge_small)."""
        return self.packset.merge_small(below=below, at_least=at_least, group=group, target=PACK_TARGET, progress=progress, merged_hook=merged_hook)

    def quarantine(self, address: str, qdir: str) -> bool:
        """Move a (corrupt) blob to ``qdir/<address>``: a loose file is renamed; a packed
        frame is copied out and its pack rewritten without it."""
        if self._loose_stat(address) is not None:  # (a stray is not moved: it is not the blob)
            try:
                os.rename(self.path_for(address), os.path.join(qdir, address))
                return True
            except FileNotFoundError:
                pass
        return self.packset.quarantine_frame(address, qdir)

    def delete(self, address: str) -> bool:
        """Remove a blob (tests and tools; gc deletes under its own protocol). A stray under
        its address is not a blob and stays."""
        if self._loose_stat(address) is not None:
            try:
                os.unlink(self.path_for(address))
                return True
            except FileNotFoundError:
                pass
        return self.packset.drop(address)
