"""Pack files: many small blobs in one file, with an index at its end (spec/format.md, "Packs").

A pack is the zstd frames of its blobs, one after the other, each exactly the frame a loose
blob would hold, then an index of fixed-size records sorted by address, then a trailer::

    frame* index trailer
    record  = address (32 bytes, raw blake3) | offset u64 | length u64 | size u64   (little endian)
    trailer = blake3(index) (32 bytes) | count u64 | magic b"casrpak1"

Its name is ``blake3(the whole file).hexdigest() + ".pack"``. Why packs exist: creating a file
costs ~0.7 ms of kernel time on the machines we measured, so 5,000 small artifacts as 5,000
blob files cost seconds; as one pack they cost one file. This module only encodes and decodes;
:mod:`casruns.store` and :mod:`casruns.batch` decide what goes into a pack and when it becomes
visible, and :mod:`casruns.packset` keeps the set of packs and the rules about when one may be
deleted.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

import blake3

from .errors import IntegrityError

MAGIC = b"casrpak1"
RECORD = struct.Struct("<32sQQQ")
TRAILER = struct.Struct("<32sQ8s")
MAX_BLOB = 1 << 20  # content size limit of a packed blob: readers refuse larger entries
MAX_ENTRIES = 1 << 16  # entries per pack: writers close a pack at this count, readers refuse more
SUFFIX = ".pack"


class PackEntry(NamedTuple):
    offset: int
    length: int  # stored bytes (the zstd frame)
    size: int  # content bytes


class PackCorrupt(IntegrityError):
    """A pack whose trailer or index cannot be trusted: none of its blobs can be located."""


def is_pack_name(name: str) -> bool:
    if len(name) != 64 + len(SUFFIX) or not name.endswith(SUFFIX):
        return False
    return all(c in "0123456789abcdef" for c in name[:64])


class PackWriter:
    """Appends frames to an open file and, at :meth:`finish`, writes the index and trailer.

    Nothing is synced here: the store's batch makes the file durable before it is renamed
    to its name, like any blob temp.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.entries: dict[bytes, PackEntry] = {}
        self.offset = 0
        self._hasher = blake3.blake3()

    def __len__(self) -> int:
        return len(self.entries)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._hasher.update(data)
        self.offset += len(data)

    def add(self, address: str, frame: bytes, size: int) -> None:
        key = bytes.fromhex(address)
        if key in self.entries:
            return
        if len(self.entries) >= MAX_ENTRIES:
            raise ValueError(f"a pack holds at most {MAX_ENTRIES} entries")
        if size > MAX_BLOB:
            raise ValueError(f"blob {address} is too large for a pack ({size} bytes)")
        self.entries[key] = PackEntry(self.offset, len(frame), size)
        self._write(frame)

    def index(self) -> dict[str, PackEntry]:
        return {k.hex(): e for k, e in self.entries.items()}

    def finish(self) -> str:
        """Write index and trailer, close the file; return the pack's name."""
        index = b"".join(RECORD.pack(k, *self.entries[k]) for k in sorted(self.entries))
        self._write(index)
        self._write(TRAILER.pack(blake3.blake3(index).digest(), len(self.entries), MAGIC))
        os.close(self.fd)
        self.fd = -1
        return self._hasher.hexdigest() + SUFFIX

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass


def read_index(fd: int, name: str = "pack") -> dict[str, PackEntry]:
    """The entries of the pack open at ``fd``, by hex address; PackCorrupt if untrustworthy."""
    size = os.fstat(fd).st_size
    if size < TRAILER.size:
        raise PackCorrupt(f"{name} is too short to be a pack ({size} bytes)")
    digest, count, magic = TRAILER.unpack(os.pread(fd, TRAILER.size, size - TRAILER.size))
    if magic != MAGIC:
        raise PackCorrupt(f"{name} has no pack trailer (magic {magic!r})")
    index_len = count * RECORD.size
    if count > MAX_ENTRIES or index_len > size - TRAILER.size:
        raise PackCorrupt(f"{name} claims {count} entries, more than a pack may hold or its size allows")
    start = size - TRAILER.size - index_len
    index = os.pread(fd, index_len, start)
    if len(index) != index_len or blake3.blake3(index).digest() != digest:
        raise PackCorrupt(f"{name}: its index does not match the checksum in its trailer")
    out: dict[str, PackEntry] = {}
    previous = b""
    for key, offset, length, blob_size in RECORD.iter_unpack(index):
        if key <= previous:
            raise PackCorrupt(f"{name}: index records are not sorted by address")
        if offset + length > start or blob_size > MAX_BLOB or length > MAX_BLOB + 4096:
            raise PackCorrupt(f"{name}: index record for {key.hex()} points outside its frames")
        previous = key
        out[key.hex()] = PackEntry(offset, length, blob_size)
    return out


def read_frame(fd: int, entry: PackEntry) -> bytes:
    data = os.pread(fd, entry.length, entry.offset)
    if len(data) != entry.length:
        raise IntegrityError(f"pack is truncated: wanted {entry.length} bytes at offset {entry.offset}")
    return data
