"""The in-memory blob store: the :class:`~casruns.store.BlobStore` contract without a disk.

For tests, embedders and dry runs; tests/test_store.py runs one contract test class against
it and against :class:`~casruns.store.DiskStore`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import BinaryIO

import blake3
import zstandard

from .batch import Batch
from .errors import BlobNotFound, IntegrityError
from .ids import validate_address
from .pins import Pin
from .store import CHUNK, LEVEL, BlobInfo, BlobStore


class MemoryStore(BlobStore):
    """An in-memory store with the same contract (tests, embedders, dry runs).

    Batches keep their new blobs aside until :meth:`Batch.sync` (a discarded batch stores
    nothing), and pins record their addresses until released, as on disk; nothing here is
    durable, and no gc runs against it, so a pin only answers :meth:`pinned`.
    """

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        self._pins: set[_MemoryPin] = set()  # the pins not yet released
        self.touched: dict[str, int] = {}  # address -> number of dedup hits (the mtime analogue)

    def contains(self, address: str) -> bool:
        return validate_address(address) in self._blobs

    def pin(self) -> Pin:
        return _MemoryPin(self)

    def pinned(self) -> set[str]:
        with self._lock:
            return set().union(*(p.addresses for p in self._pins))

    def _put_bytes(self, data: bytes, batch: Batch | None) -> BlobInfo:
        data = bytes(data)
        address = blake3.blake3(data).hexdigest()
        if batch is not None:
            info = batch.pending(address)
            if info is not None:
                return info._replace(existed=True)
        with self._lock:
            if batch is not None and batch.pin is not None:
                batch.pin.add(address)  # pin, then check (as DiskStore does)
            if address in self._blobs:
                self.touched[address] = self.touched.get(address, 0) + 1
                return BlobInfo(address, len(data), len(self._blobs[address][0]), True)
            payload = zstandard.ZstdCompressor(level=LEVEL).compress(data)
            info = BlobInfo(address, len(data), len(payload))
            if batch is None:
                self._blobs[address] = (payload, len(data))
        if batch is not None:
            batch._add(address, payload, info)  # the "temp" is the payload itself, stored at sync
        return info

    def _commit_batch(self, temps: list[tuple[bytes, BlobInfo]], packs_: list[tuple[str, str, dict]]) -> None:
        with self._lock:
            for payload, info in temps:
                self._blobs.setdefault(info.address, (payload, info.size))

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



class _MemoryPin(Pin):
    """A MemoryStore's pin: its addresses count in :meth:`MemoryStore.pinned` until released."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(None)
        self._store = store
        with store._lock:
            store._pins.add(self)

    def release(self) -> None:
        with self._store._lock:
            self._store._pins.discard(self)
