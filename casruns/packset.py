"""The pack set: the packs of ``blobs/packs/``, their in-memory index, and their maintenance.

spec/format.md, "Packs". :mod:`casruns.packs` encodes and decodes one pack file; this module
keeps the set of them: which packs exist (a per-process index cache, loaded lazily and
refreshed on a miss, since gc may have rewritten a pack whose live blobs are now in a newer
one), where a packed blob is, and the changes the set goes through: a new pack written
durably, a pack rewritten without some blobs, small packs merged, a pack deleted or moved to
quarantine. A pack is never changed in place: a new one is made durable (fsync, rename, fsync
of ``blobs/packs/``) before the old one is deleted, under the exclusive sweep lock so that no
listing of ``blobs/packs/`` overlaps the deletion.

What to delete, rewrite or merge is the caller's policy (gc passes its thresholds in); this
module only carries it out safely.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import fsutil, layout, packs
from .errors import IntegrityError, InvalidAddress, RegistryError, StrayFile
from .ids import validate_address


class PackSet:
    """The packs of one store's ``packs/`` directory, as this process last saw them.

    ``shared`` and ``exclusive`` hold the store's sweep lock (:mod:`casruns.pins`);
    ``new_writer`` opens a pack temp in the store's ``tmp/``.
    """

    def __init__(self, directory: Path, shared: Callable, exclusive: Callable, new_writer: Callable[[], packs.PackWriter]) -> None:
        self.dir = directory
        self._shared = shared
        self._exclusive = exclusive
        self._new_writer = new_writer
        self._packs: dict[str, dict[str, packs.PackEntry]] = {}  # pack name -> its index
        self._where: dict[str, str] = {}  # address -> a pack holding it
        self.bad: dict[str, str] = {}  # pack name -> why its index cannot be read
        self._index_lock = threading.Lock()  # guards reading and swapping the three fields above
        self._refresh_lock = threading.RLock()  # one refresh at a time
        self._packs_seen: tuple[int, int] | None = None  # (inode, mtime_ns) of packs/ at the last look
        self._packs_seen_settled = False  # ... and that look came well after that mtime

    def addresses(self) -> set[str]:
        """Every packed address, after a fresh look at ``blobs/packs/``."""
        self.refresh()
        with self._index_lock:
            return set(self._where)

    def path(self, name: str) -> Path:
        if not packs.is_pack_name(name):
            raise InvalidAddress(f"invalid pack name {name!r}")
        return self.dir / name

    def names(self) -> list[str]:
        """The readable packs, after a fresh look at ``blobs/packs/`` (see :attr:`bad`)."""
        self.refresh()
        with self._index_lock:
            return sorted(self._packs)

    def readable(self, name: str) -> bool:
        """Whether the pack's index reads now (a fresh look at the file, not the cache)."""
        try:
            fd = self.open(name)
        except FileNotFoundError:
            return False
        try:
            packs.read_index(fd, name)
            return True
        except packs.PackCorrupt:
            return False
        finally:
            os.close(fd)

    def index(self, name: str) -> dict[str, packs.PackEntry]:
        """A pack's entries by address ({} for a pack not, or no longer, known)."""
        with self._index_lock:
            return dict(self._packs.get(name) or {})

    def open(self, name: str) -> int:
        """A pack opened for reading. FileNotFoundError if it is gone, or if a stray (not a
        regular file) has its name: a stray is never a pack, and readers then look again."""
        path = self.path(name)
        try:
            return fsutil.open_regular(path)
        except StrayFile as e:
            raise FileNotFoundError(errno.ENOENT, e.message, str(path)) from None

    def add(self, name: str, index: dict) -> None:
        # in place: a refresh (which builds aside from these dicts) cannot run meanwhile
        with self._refresh_lock, self._index_lock:
            self._packs[name] = index
            for address in index:
                self._where.setdefault(address, name)

    def refresh(self, cheap: bool = False) -> None:
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
                with self._shared():  # no pack is deleted while we list (gc deletes under the exclusive hold)
                    listed_at = time.time()
                    try:
                        st = os.lstat(self.dir)
                        seen = (st.st_ino, st.st_mtime_ns) if stat.S_ISDIR(st.st_mode) else (0, 0)
                    except (FileNotFoundError, NotADirectoryError):
                        seen = (0, 0)
                    if seen == self._packs_seen and (cheap or self._packs_seen_settled):
                        return
                    # only regular files are packs: a FIFO would block the open, a directory
                    # fail every read; a symlink is never followed (nor packs/ as one)
                    names = set(layout.scan(self.dir, packs.is_pack_name, stat.S_ISREG)[0]) if seen != (0, 0) else set()
                # An unchanged mtime proves an unchanged directory only if our listing came
                # after the tick of that mtime (timestamps are coarse): allow a second.
                settled = listed_at - st.st_mtime > 1.0 if seen != (0, 0) else True
                with self._index_lock:
                    old_packs, old_bad = self._packs, self.bad
                if names == old_packs.keys() | old_bad.keys():
                    self._packs_seen, self._packs_seen_settled = seen, settled
                    return
                new_packs = {n: old_packs[n] for n in names if n in old_packs}
                new_bad = {n: old_bad[n] for n in names if n in old_bad}
                vanished = False
                for name in sorted(names - new_packs.keys() - new_bad.keys()):
                    try:
                        fd = self.open(name)
                    except FileNotFoundError:
                        vanished = True  # (or a stray now: the next listing skips it)
                        continue
                    try:
                        new_packs[name] = packs.read_index(fd, f"pack {name}")
                    except packs.PackCorrupt as e:
                        new_bad[name] = e.message
                    except OSError as e:  # EIO and the like: nothing is swapped in, retry later
                        raise RegistryError(f"cannot read pack {self.dir / name}: {e.strerror}") from e
                    finally:
                        os.close(fd)
                where: dict[str, str] = {}
                for name in sorted(new_packs):
                    for address in new_packs[name]:
                        where.setdefault(address, name)
                with self._index_lock:
                    self._packs, self._where, self.bad = new_packs, where, new_bad
                self._packs_seen, self._packs_seen_settled = seen, settled and not vanished
                if not vanished:
                    return

    def locate(self, address: str, cheap: bool = False) -> tuple[str, packs.PackEntry] | None:
        validate_address(address)
        for attempt in range(2):
            with self._index_lock:
                name = self._where.get(address)
                index = self._packs.get(name) if name is not None else None
                if index is not None and address in index:
                    return name, index[address]
            if attempt:
                return None
            self.refresh(cheap)
        return None

    def find(self, address: str) -> int | None:
        """The frame size of ``address`` in a pack that exists right now, or None.

        Called holding the sweep lock shared, after pinning: a pack that exists now cannot be
        deleted before gc has read our pin. Its mtime is not touched (a pack's mtime stays its
        creation time), so a hot blob does not keep a pack's garbage alive.
        """
        for _ in range(3):
            loc = self.locate(address, cheap=True)
            if loc is None:
                return None
            try:
                if stat.S_ISREG(os.lstat(self.dir / loc[0]).st_mode):
                    return loc[1].length
            except FileNotFoundError:
                pass
            self.refresh()  # rewritten by gc a moment ago: look again
        return None

    def read_frame(self, address: str) -> tuple[str, packs.PackEntry, bytes] | None:
        """The raw frame of a packed blob: (pack name, entry, frame); None if not packed."""
        for _ in range(3):
            loc = self.locate(address)
            if loc is None:
                return None
            name, entry = loc
            try:
                fd = self.open(name)
            except FileNotFoundError:
                self.refresh()
                continue
            try:
                return name, entry, packs.read_frame(fd, entry)
            except IntegrityError as e:
                raise IntegrityError(f"blob {address}: {e.message} in pack {name}", address=address) from None
            finally:
                os.close(fd)
        return None

    def write(self, frames: Iterator[tuple[str, bytes, int]]) -> str | None:
        """A new durable pack of (address, frame, size); its name, or None if there were none."""
        writer = self._new_writer()
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
            layout.real_dir(self.dir)
            os.rename(writer.path, self.dir / name)
        except BaseException:
            writer.abandon()
            raise
        fsutil.fsync_dir(self.dir)
        self.add(name, writer.index())
        return name

    def rewrite(self, name: str, keep: set[str]) -> str | None:
        """Copy the frames of ``keep`` from pack ``name`` into a new durable pack (not verified:
        a corrupt frame stays corrupt, and verify finds it). The old pack is left in place.
        Raises FileNotFoundError if the pack is gone (another process rewrote it)."""
        index = self.index(name)
        fd = self.open(name)
        try:
            frames = ((a, packs.read_frame(fd, index[a]), index[a].size) for a in sorted(keep) if a in index)
            return self.write(frames)
        finally:
            os.close(fd)

    def merge(self, names: list[str]) -> str | None:
        """Copy every entry of the packs ``names`` (each address once) into one new durable pack.

        Nothing is dropped, so deleting the merged packs afterwards loses no blob, pinned or
        not. Raises FileNotFoundError if one of them is gone (another process rewrote it).
        """
        seen: set[str] = set()

        def frames():
            for name in names:  # one open at a time: a group may hold thousands of tiny packs
                fd = self.open(name)
                try:
                    index = packs.read_index(fd, name)  # from the file itself, not the cache
                    for address in sorted(index):
                        if address not in seen:
                            seen.add(address)
                            yield address, packs.read_frame(fd, index[address]), index[address].size
                finally:
                    os.close(fd)

        if sum(len(self.index(n)) for n in names) > packs.MAX_ENTRIES:
            raise ValueError(f"a merge of {len(names)} packs would exceed {packs.MAX_ENTRIES} entries")
        return self.write(frames())

    def unlink(self, name: str) -> bool:
        """Delete pack ``name``'s file; False if it was gone. The caller holds the sweep lock
        exclusively (gc, after checking the pins) and refreshes the index afterwards."""
        return layout.unlink(self.path(name))

    def delete(self, name: str) -> bool:
        """Delete a pack whose blobs live on elsewhere (a durable rewrite), under the exclusive
        sweep lock so that no listing of packs/ overlaps the deletion."""
        with self._exclusive():
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                return False
        self.refresh()
        return True

    def quarantine_frame(self, address: str, qdir: str) -> bool:
        """Copy a (corrupt) packed blob's frame to ``qdir/<address>`` and rewrite its pack
        without it; False if no pack holds it."""
        for _ in range(3):
            got = self.read_frame(address)
            if got is None:
                return False
            name, _, frame = got
            fsutil.atomic_write(os.path.join(qdir, address), frame)
            try:
                self.replace(name, set(self.index(name)) - {address})
                return True
            except FileNotFoundError:  # gc rewrote or merged that pack meanwhile: the frame moved
                self.refresh()
        return False

    def quarantine_pack(self, name: str, qdir: str) -> bool:
        """Move a whole pack (one whose index cannot be read) to ``qdir/<name>``; False if gone."""
        try:
            os.rename(self.path(name), os.path.join(qdir, name))
            return True
        except FileNotFoundError:
            return False

    def drop(self, address: str) -> bool:
        """Rewrite the pack holding ``address`` without it; False if no pack holds it."""
        loc = self.locate(address)
        if loc is None:
            return False
        self.replace(loc[0], set(self.index(loc[0])) - {address})
        return True

    def replace(self, name: str, keep: set[str]) -> None:
        """Rewrite pack ``name`` with ``keep`` only, then delete it (never the new pack: names
        are content hashes, so a rewrite keeping everything in order has the same name)."""
        if self.rewrite(name, keep) != name:
            self.delete(name)


    def merge_small(
        self, *, below: int, at_least: int, group: int, target: int, progress=None, merged_hook: Callable[[], None] | None = None
    ) -> int:
        """Merge the packs smaller than ``below`` bytes, once there are ``at_least`` of them,
        into packs of up to ``target`` bytes and at most ``group`` sources each; the number of
        packs merged away. (Every run with many artifacts leaves one small pack; thousands of
        them would make every reader's first lookup load thousands of indexes.) Every entry is
        copied, garbage included, so deleting the merged packs afterwards needs no pin check;
        the new pack is durable, and read back, first. ``merged_hook`` runs after each new
        pack is durable, before its sources are deleted (a crash window)."""
        small = []
        for name in self.names():
            try:
                size = os.stat(self.path(name)).st_size
            except FileNotFoundError:
                continue
            if size < below:
                small.append((name, size, len(self.index(name))))
        if len(small) < at_least:
            return 0
        # A group fits one pack: its bytes, its entries (readers refuse a pack of more than
        # MAX_ENTRIES) and a bounded number of source files.
        groups: list[list[str]] = [[]]
        total = entries = 0
        for name, size, count in small:
            if groups[-1] and (total + size > target or entries + count > packs.MAX_ENTRIES or len(groups[-1]) >= group):
                groups.append([])
                total = entries = 0
            groups[-1].append(name)
            total += size
            entries += count
        removed = 0
        for i, sources in enumerate(groups):
            if progress:
                progress("merging small packs", i + 1, len(groups))
            if len(sources) < 2:
                continue
            try:
                merged = self.merge(sources)
            except (OSError, ValueError):
                continue  # one of them vanished (quarantine), or a full disk: the next gc merges again
            if merged is None or not self.readable(merged):
                continue  # never delete the sources of a pack no reader would accept
            if merged_hook is not None:
                merged_hook()
            with self._exclusive():  # not for pins (nothing was dropped): so that no listing of packs/ overlaps
                for name in sources:
                    # Names are content hashes: when one pack of the group holds all the others'
                    # entries in address order, the merge reproduces it byte for byte, under its name.
                    if name != merged and self.unlink(name):
                        removed += 1
        self.names()  # forget the packs deleted here
        return removed
