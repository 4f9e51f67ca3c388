"""Batches: the puts of one ingest, made durable together before a manifest references them.

spec/format.md, "Batches and the write order rule". A batch's puts write temps (or hold small
frames for a pack) without fsync; :meth:`Batch.sync` hands them to the store, which makes the
data durable (one ``syncfs`` for many, per-file fsync for a few), renames them to their names
and syncs the directories. The rule callers keep: a manifest that references a blob is
committed only after the batch holding that blob was synced.

The store decides what a put writes (:mod:`casruns.store`); this module keeps what a batch
holds until it is synced or discarded, and when a pack is begun and closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from . import fsutil

if TYPE_CHECKING:
    from .pins import Pin
    from .store import BlobInfo, BlobStore

FEW = 8  # a batch with at most this many new blobs fsyncs them one by one instead of syncfs


class Batch:
    """Puts whose durability is settled once, by :meth:`sync`, before a manifest commit.

    Usable as a context manager: leaving the block normally syncs; leaving it with an
    exception discards the batch's temp files (nothing references them yet).

    On a store that packs, small new blobs are held in memory until the batch has more than
    ``FEW`` of them; from then on they go into pack files (spec/format.md, "Packs"). A batch
    with few small blobs writes them as loose files at :meth:`sync`.
    """

    def __init__(self, store: "BlobStore", pin: "Pin | None" = None) -> None:
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
        if self.store._pack_full(self._pack):
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
            self.store._drop_temp(tmp)
        if self._pack is not None:
            self._pack.abandon()
            self._pack = None
        self._temps, self._packs, self._small = [], [], []
        self._pending.clear()


def commit_in_order(root, temps: list, packs_: list, place_loose: Callable, place_pack: Callable) -> None:
    """Make a batch durable in the write order: data first, then names, then the directories
    (spec/format.md, "Batches and the write order rule", steps 2 to 4). ``place_loose(tmp,
    info)`` and ``place_pack(tmp, name, index)`` rename a synced temp to its name in the store
    and return the directory that then needs a sync."""
    files = [t for t, _ in temps] + [t for t, _, _ in packs_]
    many = len(files) > FEW
    # 1. data: every temp file's content reaches stable storage before any rename.
    if many:
        try:
            fsutil.syncfs(root)
        except OSError:
            many = False
    if not many:
        for tmp in files:
            fd = fsutil.open_regular(tmp)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    # 2. names (creating shard directories durably as needed).
    dirs = fsutil.DirSync()
    for tmp, info in temps:
        dirs.add(place_loose(tmp, info))
    for tmp, name, index in packs_:
        dirs.add(place_pack(tmp, name, index))
    # 3. directories: one syncfs covers them all when there are many.
    if many:
        fsutil.syncfs(root)
    else:
        dirs.sync()

