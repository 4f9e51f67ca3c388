"""The blob store's directory layout: the names it gives meaning to, typed listings, strays.

``blobs/`` holds loose blobs at ``<address[:2]>/<address[2:]>`` (spec/format.md, "Blobs"),
``packs/`` (pack files, :mod:`casruns.packs`), ``pins/`` (:mod:`casruns.pins`), ``tmp/`` (temps)
and ``sweep.lock``. Every path into the store is built here or by the store's classes, never
by their callers (gc, verify and archive ask the store).

Strays (spec/format.md, "Strays"): listings keep regular files and real directories only, and
report the rest; a FIFO, directory or symlink with a blob's, pack's, pin's or temp's name is
therefore never waited on, followed or taken for what its name says. Light on purpose: no
zstd or blake3 (this module is imported by pins, which gc reads).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from . import fsutil, packs
from .errors import BlobNotFound, StrayFile
from .ids import is_address, validate_address

PIN_SUFFIXES = (".pin", ".done")  # pin files gc reads: live or settled pins, and settled pins of casruns 0.1
# A directory of the store, opened without following a symlink (or waiting on a FIFO) in its place.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # a path through a missing name, a stray or a symlink


def loose_name(address: str) -> str:
    """A loose blob's path relative to ``blobs/`` (the same in an archive): ``ab/cdef…``."""
    validate_address(address)
    return f"{address[:2]}/{address[2:]}"


def is_shard(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def is_loose_name(name: str) -> bool:
    return len(name) == 62 and is_address("00" + name)


def scan(directory: Path, named, is_kind) -> tuple[list[str], list[tuple[str, str]]]:
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
        if e.errno not in ABSENT:
            raise
    return sorted(good), sorted(strays)


def real_dir(path: Path) -> None:
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


def iter_strays(root: Path) -> Iterator[tuple[str, str]]:
    """Every stray in the store at ``root``, sorted: (its path relative to ``blobs/``, its kind).

    A stray is an entry with a name the store gives meaning to but of the wrong type: a
    shard, ``packs/``, ``pins/`` or ``tmp/`` that is not a real directory (a symlink to
    one included); a loose blob, pack, pin or temp that is not a regular file. Readers skip
    strays and writers never take one for a blob; only verify lists them.
    """
    special = {"packs": packs.is_pack_name, "pins": lambda n: n.endswith((*PIN_SUFFIXES, ".pin.new")), "tmp": lambda n: True}
    dirs, out = scan(root, lambda n: is_shard(n) or n in special, stat.S_ISDIR)
    for name in dirs:
        named = special.get(name, is_loose_name)
        out += [(f"{name}/{n}", kind) for n, kind in scan(root / name, named, stat.S_ISREG)[1]]
    yield from sorted(out)


def loose_stray(root: str, address: str) -> tuple[str, str] | None:
    """The stray (path relative to ``blobs/``, kind) where ``address``'s loose file or its
    shard directory should be, or None."""
    validate_address(address)
    for rel, is_kind in ((address[:2], stat.S_ISDIR), (f"{address[:2]}/{address[2:]}", stat.S_ISREG)):
        try:
            mode = os.lstat(f"{root}/{rel}").st_mode
        except OSError:
            return None
        if not is_kind(mode):
            return rel, fsutil.kind_of(mode)
    return None


def missing_error(root: str, address: str) -> BlobNotFound:
    """The error for a blob that is not stored, naming a stray in its place if there is one."""
    stray = loose_stray(root, address)
    if stray is None:
        return BlobNotFound(f"blob {address} not found in {root}", address=address)
    path = f"{root}/{stray[0]}"
    what = {"fifo": "a FIFO", "symlink": "a symlink", "directory": "a directory", "file": "a file"}.get(stray[1], f"a {stray[1]}")
    return BlobNotFound(
        f"blob {address} is not stored: {path} is {what}, a stray that is never read (run casruns verify)",
        address=address,
        path=path,
    )


def unlink_quiet(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def unlink(path: str | os.PathLike) -> bool:
    """Delete a store file; False if it was already gone."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
