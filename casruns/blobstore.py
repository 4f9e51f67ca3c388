"""The blob store's interface: what every store (on disk, in memory) must do, and the parts
they share. A blob is addressed by the blake3 of its content and stored as one zstd frame;
reads verify. ``DiskStore`` (casruns/store.py) and ``MemoryStore`` (casruns/memstore.py)
implement it, and one contract test class runs against both (tests/test_store.py)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from . import fsutil
from .errors import RegistryError

if TYPE_CHECKING:
    from .batch import Batch
    from .pins import Pin

SMALL = 1 << 20  # content up to this size is hashed before it is compressed (cheap dedup)


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

    # -- what a Batch asks of its store (casruns.batch) -----------------------------------
    @abstractmethod
    def _commit_batch(self, temps: list[tuple[object, BlobInfo]], packs: list[tuple[str, str, dict]]) -> None:
        """Make a batch's pending blobs (its temps, its finished packs) durable and visible."""

    def _drop_temp(self, tmp: object) -> None:
        """Forget a temp of a discarded batch (a store without temp files: nothing to do)."""

    def _write_temp(self, payload: bytes, durable: bool) -> str:
        raise NotImplementedError  # only stores that pack hold frames back (Batch._add_small)

    def _new_pack(self):
        raise NotImplementedError

    def _pack_full(self, writer) -> bool:
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
        from .batch import Batch

        return Batch(self, pin)

    @abstractmethod
    def pin(self) -> "Pin":
        """A pin for an ingest: the addresses a batch made with it uses are gc roots until it
        is released (spec/format.md, "Pins and the sweep lock")."""

    @abstractmethod
    def pinned(self) -> set[str]:
        """The addresses of the pins that are not released yet."""


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
