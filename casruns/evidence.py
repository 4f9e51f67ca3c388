"""Evidence: a run's logs (live or stored, from an offset), its artifact tree, one artifact,
and an export of all of it to a directory outside the registry."""

from __future__ import annotations

import json
import os

from collections.abc import Iterator
from . import fsutil, query
from . import manifest as mf
from .errors import ArtifactNotFound, InvalidInput, RegistryError

TYPE_CHECKING = False  # typing costs 3 ms on the status path
if TYPE_CHECKING:
    from .root import RegistryRoot
    from .tree import Tree

LOG_STREAMS = ("stdout", "stderr", "transcript")


def log_chunks(
    reg: "RegistryRoot", run_id: str, stream: str = "stdout", *, follow: bool = False, offset: int = 0
) -> Iterator[bytes]:
    """The bytes of one log stream from byte ``offset`` on; with ``follow``, keeps yielding
    until the run ends. An offset beyond the end yields nothing (a live run's bytes from there
    on, once written).

    Following sleeps on a watch of the spool and run directories (``notify``), so an append
    wakes it at once; it looks at the run at least every ``notify.RECHECK`` seconds anyway,
    which reaps a run whose supervisor is lost, so following always ends.
    """
    if stream not in LOG_STREAMS:
        raise InvalidInput(f"unknown stream {stream!r}; one of: {', '.join(LOG_STREAMS)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInput(f"offset must be a byte count of 0 or more, not {offset!r}")
    run = reg.run_dir(run_id)
    m = query.manifest(reg, run_id)
    fd = None
    watch = None
    if follow:
        from . import notify
    try:
        while True:
            if m["status"] in mf.TERMINAL:
                if fd is not None:  # drain the spool we hold open, even if it was unlinked
                    yield from _drain(fd)
                    return
                ref = (m.get("logs") or {}).get(stream)
                if ref:
                    yield from _skip(reg.store.iter_chunks(ref["blake3"]), offset)
                elif m.get("collection_pending"):
                    yield from _skip(_read_spool(run.spool(stream)), offset)  # ended on a full disk
                return
            if follow and watch is None:
                watch = notify.watch([run.spool_dir, run.path])  # before reading: no append is missed
            if fd is None:
                try:
                    fd = fsutil.open_regular(run.spool(stream))  # a FIFO or symlink there: StrayFile, never a hang
                except FileNotFoundError:
                    fd = None
                else:
                    os.lseek(fd, offset, os.SEEK_SET)  # past the end: reads start there once written
            if fd is not None:
                yield from _drain(fd)
            if not follow:
                return
            watch.wait(notify.RECHECK)
            m = query.get(reg, run_id)  # reaps a lost run, so follow always ends
            m = reg.run_dir(run_id).read() if m["terminal"] else {"status": m["status"]}
    finally:
        if fd is not None:
            os.close(fd)
        if watch is not None:
            watch.close()


def _drain(fd: int) -> Iterator[bytes]:
    while data := os.read(fd, 1 << 20):
        yield data


def tree(reg: "RegistryRoot", run_id: str) -> "Tree":
    from .tree import Tree

    m = query.manifest(reg, run_id)
    ref = (m.get("artifacts") or {}).get("tree")
    if not ref:
        return Tree()
    return Tree.load(reg.store, ref)


def cat(reg: "RegistryRoot", run_id: str, path: str) -> Iterator[bytes]:
    entry = tree(reg, run_id).get(path)
    if entry is None or entry.type != "file":
        raise ArtifactNotFound(f"run {run_id} has no artifact file {path!r}", run_id=run_id, path=path)
    assert entry.blake3 is not None
    return reg.store.iter_chunks(entry.blake3)


def export(reg: "RegistryRoot", run_id: str, dest: str, progress=None) -> dict:
    """Materialize artifacts under ``DEST/artifacts``, logs under ``DEST/logs`` and the record
    as ``DEST/run.json``.

    DEST may exist (a real directory, never a symlink or a file), but none of the three
    entries may: they are built in a fresh directory inside DEST and renamed into place, so
    nothing already standing there (a symlink planted as ``DEST/logs``, say) is followed.
    """
    import shutil
    import stat as stat_mod
    import tempfile

    from .errors import UnsafePath
    from .tree import materialize

    record = query.get(reg, run_id)
    m = query.manifest(reg, run_id)
    if not m["status"] in mf.TERMINAL:
        raise InvalidInput(f"run {run_id} is {m['status']}; export needs a finished run (try wait first)")
    dest = os.path.abspath(dest)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.makedirs(dest)
    else:
        if not stat_mod.S_ISDIR(st.st_mode):
            raise UnsafePath(f"export destination {dest} exists and is not a directory (a symlink or a file); refusing to write through it", path=dest)
    entries = ("artifacts", "logs", "run.json")
    for name in entries:
        if os.path.lexists(os.path.join(dest, name)):
            raise InvalidInput(f"{os.path.join(dest, name)} already exists; export into an empty or new directory", path=dest)
    staging = tempfile.mkdtemp(prefix=".casruns-export-", dir=dest)
    try:
        report = materialize(tree(reg, run_id), reg.store, os.path.join(staging, "artifacts"), progress=progress)
        logs_dir = os.path.join(staging, "logs")
        os.mkdir(logs_dir, 0o755)
        for stream, ref in (m.get("logs") or {}).items():
            if stream in LOG_STREAMS and ref:
                reg.store.copy_to(ref["blake3"], os.path.join(logs_dir, f"{stream}.log"), mode=0o644)
        fsutil.atomic_write(os.path.join(staging, "run.json"), json.dumps(record, indent=2).encode() + b"\n", mode=0o644)
        for name in entries:
            # rename never follows a symlink at the target; a directory planted there since
            # the check above makes it fail (ENOTEMPTY/EISDIR) instead of writing into it
            os.rename(os.path.join(staging, name), os.path.join(dest, name))
        os.chmod(os.path.join(dest, "artifacts"), 0o755)
        os.chmod(logs_dir.replace(staging, dest), 0o755)
    except OSError as e:
        raise RegistryError(f"cannot export to {dest}: {e.strerror}", path=dest) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"schema": "casruns/export/v1", "run_id": run_id, "dest": dest, **report}


def _read_spool(path: str) -> Iterator[bytes]:
    try:
        fd = fsutil.open_regular(path)
    except FileNotFoundError:
        return
    try:
        yield from _drain(fd)
    finally:
        os.close(fd)


def _skip(chunks: Iterator[bytes], offset: int) -> Iterator[bytes]:
    for chunk in chunks:
        if offset >= len(chunk):
            offset -= len(chunk)
            continue
        yield chunk[offset:]
        offset = 0
