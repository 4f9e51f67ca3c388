"""Checking a blob's stored form, one zstd frame, that was not read through a loose file:
a frame from a pack (decoded whole: packed blobs are small) or from elsewhere (an archive, a
pull), decoded and re-hashed as it arrives with bounded memory (spec/format.md, "Blobs":
verification; "Packs": reading).
"""

from __future__ import annotations

import os
from typing import BinaryIO

import blake3
import zstandard

from .errors import IntegrityError

CHUNK = 1 << 20


def decode_packed(address: str, size: int, frame: bytes, where: str) -> bytes:
    """The content of a packed blob's frame, verified: its header's content size must equal
    the index's ``size`` (so a damaged header cannot make us allocate more), and the content
    must hash to ``address``. ``where`` names the pack in errors."""
    try:
        if zstandard.frame_content_size(frame) != size:
            raise IntegrityError(f"blob {address} is corrupt: its frame header disagrees with the index of {where}", address=address)
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(size, 1))
    except zstandard.ZstdError as e:
        raise IntegrityError(f"blob {address} cannot be decoded ({e}): {where}", address=address) from None
    digest = blake3.blake3(data).hexdigest()
    if digest != address:
        raise IntegrityError(f"blob {address} is corrupt: its content hashes to {digest}: {where}", address=address)
    return data


def check_frame(address: str, frame: bytes) -> int:
    """Verify a frame in memory (one whole frame, content hashing to ``address``); its size."""
    check = FrameCheck(address)
    check.feed(frame)
    return check.finish()


class FrameCheck:
    """Decode and re-hash a frame from elsewhere as it arrives: exactly one frame, nothing
    after it, content hashing to the address. Fed in pieces of 512 input bytes, each of which
    expands to at most ~16 MiB (RLE blocks), so a hostile frame cannot blow up memory."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.hasher = blake3.blake3()
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        """Decode and hash one more piece, keeping none of it."""
        for _ in self.pieces(chunk):
            pass

    def pieces(self, chunk: bytes):
        """Decode one more piece, yielding the content as it comes (at most ~16 MiB at a time,
        whatever the frame claims; not yet verified: only :meth:`finish` says the whole
        matches its address)."""
        try:
            for i in range(0, len(chunk), 512):
                if self.dobj.eof:
                    raise IntegrityError(f"blob {self.address} has data after its zstd frame", address=self.address)
                out = self.dobj.decompress(chunk[i : i + 512])
                self.hasher.update(out)
                self.size += len(out)
                if out:
                    yield out
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


def read_up_to(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream (a socket may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(min(CHUNK, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def content_size(frame: bytes) -> int:
    """The content size a frame's header records; -1 if it records none (or is no frame)."""
    try:
        return zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return -1


def frame_end(fd: int) -> int:
    """Where the first zstd frame of an open file ends (its compressed size), found by walking
    the block headers with ``pread``: a few bytes read per 128 KiB block, nothing decoded.

    A loose blob is exactly one frame (spec/format.md, "Blobs"): a reader that decodes only
    the first frame would otherwise take a file with bytes after it for a good copy (and push
    it to an archive, whose pull then refuses it). Raises ValueError on a malformed header.
    """
    head = os.pread(fd, 18, 0)  # the longest frame header
    size = zstandard.frame_header_size(head)
    params = zstandard.get_frame_parameters(head)
    pos = size
    while True:
        raw = os.pread(fd, 3, pos)
        if len(raw) < 3:
            raise ValueError("the zstd frame ends inside a block header")
        v = int.from_bytes(raw, "little")
        last, kind, length = v & 1, (v >> 1) & 3, v >> 3
        pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
        if last:
            break
    return pos + (4 if params.has_checksum else 0)
