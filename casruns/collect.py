"""Collection: turning a run's workspace (spooled logs, artifact files) into blobs and refs.

Used by the supervisor when a run ends and by the reaper when it salvages a lost run.
The write order is the one spec/format.md requires:

1. every log and artifact file goes into one store batch (temp files, no fsync yet);
2. the batch is synced: all blobs durable and renamed to their addresses;
3. the manifest is committed (terminal status, refs) under the run lock;
4. the workspace is deleted.

Crash points: before 3 the manifest still says the run is active and its supervisor lock
is free, so the reaper collects again (dedup makes that cheap); between 3 and 4 the run is
complete and the leftover workspace is garbage that ``reap`` or ``gc`` removes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import fsutil
from . import manifest as mf
from .runs import SPOOL_STREAMS, RunDir
from .timefmt import format_ts, now_ts
from .tree import Tree, collect as collect_tree

if TYPE_CHECKING:
    from .redaction import Redactor
    from .store import BlobStore


def ingest_workspace(
    run: RunDir,
    store: "BlobStore",
    *,
    exclude: set[str] = frozenset(),
    redactor: "Redactor | None" = None,
    policy: str = "redact",
    artifacts: bool = True,
    pin=None,
) -> tuple[dict, dict | None]:
    """Store the spool files and the artifact tree.

    Returns (manifest fields to set, error or None). Logs and artifacts are separate batches,
    so an artifact directory that cannot be collected still leaves the logs.
    """
    refs: dict = {}
    with store.batch(pin) as batch:
        logs = {}
        for stream in SPOOL_STREAMS:
            path = run.spool(stream)
            if os.path.isfile(path):
                info = batch.put_file(path)
                logs[stream] = {"blake3": info.address, "size": info.size}
        # leaving the block syncs the batch: every blob is durable before we return.
    refs["logs"] = logs
    if not artifacts:
        # a salvage of a run that declared secrets: its secret values died with the
        # supervisor, so its artifacts cannot be scanned. Fail closed: do not store them.
        tree = Tree(skipped=[{"path": ".", "reason": "not collected: the run declared secrets and its supervisor was lost"}])
        with store.batch(pin) as batch:
            refs["artifacts"] = {"tree": tree.store(batch), "files": 0, "bytes": 0, "skipped": 1}
        return refs, None
    try:
        with store.batch(pin) as batch:
            tree = collect_tree(run.artifacts_dir, batch, exclude=exclude, redactor=redactor, policy=policy)
            tree_address = tree.store(batch)
    except Exception as e:  # an unreadable tree must not wedge the run
        if fsutil.is_no_space(e):
            raise  # not the tree's fault: the caller defers collection, losing nothing
        message = f"cannot collect artifacts: {type(e).__name__}: {e}"
        return refs, {"code": "collect_failed", "message": redactor.text(message) if redactor else message}
    arts = {"tree": tree_address, "files": tree.files, "bytes": tree.total_size}
    if tree.skipped:
        arts["skipped"] = len(tree.skipped)
    flagged = sum(1 for e in tree.entries if e.extra.get("secrets"))
    if flagged:
        arts["with_secrets"] = flagged
    refs["artifacts"] = arts
    return refs, None


def finish(
    run: RunDir,
    store: "BlobStore",
    status: str,
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    error: dict | None = None,
    extra: dict | None = None,
    exclude: set[str] = frozenset(),
    redactor: "Redactor | None" = None,
    policy: str = "redact",
    artifacts: bool = True,
) -> dict:
    """Collect the workspace and commit the terminal status. Returns the final manifest.

    A cancel requested before this commit wins over a normal ending (spec/format.md). If the
    artifacts cannot be collected the run ends ``failed`` with ``collect_failed``.
    """
    # The pin keeps every blob we use alive against a concurrent gc until the manifest that
    # references them is committed (spec/format.md, "Garbage collection").
    with store.pin() as pin:
        return _finish(run, store, status, exit_code, signal, error, extra, exclude, redactor, policy, artifacts, pin)


def finish_deferred(
    run: RunDir,
    status: str,
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    error: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Commit the terminal status without collecting: the disk is full, so the spooled output
    stays in the workspace, marked ``collection_pending``, until ``reap`` can store it.

    Needs only the space of one manifest rewrite (the supervisor frees its reserve first).
    """
    with run.update() as m:
        if m["status"] in mf.TERMINAL:
            return m
        if m["status"] != mf.COLLECTING and mf.COLLECTING in mf.TRANSITIONS[m["status"]]:
            mf.transition(m, mf.COLLECTING, now_ts())
        for k, v in (("exit_code", exit_code), ("signal", signal), ("error", error)):
            if v is not None:
                m[k] = v
        if extra:
            m.update(extra)
        m["collection_pending"] = True
        mf.transition(m, mf.CANCELLED if m.get("cancel") else status, now_ts())
        return m


def complete_pending(
    run: RunDir, store: "BlobStore", *, artifacts: bool, redactor: "Redactor | None" = None, policy: str = "redact"
) -> dict | None:
    """Store the workspace of a terminal run whose collection was deferred (``collection_pending``)
    and commit its refs. Returns the manifest, or None if there was nothing to do. Raises
    NoSpace if the disk is still full (nothing is lost: the workspace stays)."""
    m = run.read_fresh()
    if m["status"] not in mf.TERMINAL or not m.get("collection_pending"):
        return None
    with store.pin() as pin:
        refs, collect_error = ingest_workspace(run, store, artifacts=artifacts, pin=pin, redactor=redactor, policy=policy)
        with run.update() as m:
            if not m.get("collection_pending"):
                return m  # another reaper finished it
            m.update(refs)
            if collect_error is not None:
                m.setdefault("collection_error", collect_error)
            m.pop("collection_pending", None)
            result = m
    run.remove_workspace()
    return result


def _finish(run, store, status, exit_code, signal, error, extra, exclude, redactor, policy, artifacts, pin) -> dict:
    refs, collect_error = ingest_workspace(
        run, store, exclude=exclude, redactor=redactor, policy=policy, artifacts=artifacts, pin=pin
    )
    if collect_error is not None:
        status, error = mf.FAILED, collect_error
    heartbeat = run.mtime("heartbeat")
    activity = run.last_activity()
    with run.update() as m:
        if m["status"] in mf.TERMINAL:
            return m  # somebody (a reaper racing us) already finished it
        final = status
        if m.get("cancel"):
            final = mf.CANCELLED
        if m["status"] != mf.COLLECTING and mf.COLLECTING in mf.TRANSITIONS[m["status"]]:
            mf.transition(m, mf.COLLECTING, now_ts())
        m.update(refs)
        if exit_code is not None:
            m["exit_code"] = exit_code
        if signal is not None:
            m["signal"] = signal
        if error:
            m["error"] = error
        if extra:
            m.update(extra)
        m["heartbeat_at"] = format_ts(heartbeat) if heartbeat else None
        m["last_activity_at"] = format_ts(activity) if activity else None
        mf.transition(m, final, now_ts())
        result = m
    run.remove_workspace()
    return result

