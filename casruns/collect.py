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

from . import manifest as mf
from .runs import SPOOL_STREAMS, RunDir
from .timefmt import format_ts, now_ts
from .tree import collect as collect_tree

if TYPE_CHECKING:
    from .redaction import Redactor
    from .store import BlobStore


def ingest_workspace(
    run: RunDir, store: "BlobStore", *, exclude: set[str] = frozenset(), redactor: "Redactor | None" = None, policy: str = "redact"
) -> dict:
    """Store the spool files and the artifact tree; returns the manifest fields to set."""
    with store.batch() as batch:
        logs = {}
        for stream in SPOOL_STREAMS:
            path = run.spool(stream)
            if os.path.isfile(path):
                info = batch.put_file(path)
                logs[stream] = {"blake3": info.address, "size": info.size}
        tree = collect_tree(run.artifacts_dir, batch, exclude=exclude, redactor=redactor, policy=policy)
        tree_address = tree.store(batch)
        # leaving the block syncs the batch: every blob is durable before we return.
    artifacts = {"tree": tree_address, "files": tree.files, "bytes": tree.total_size}
    if tree.skipped:
        artifacts["skipped"] = len(tree.skipped)
    flagged = sum(1 for e in tree.entries if e.extra.get("secrets"))
    if flagged:
        artifacts["with_secrets"] = flagged
    return {"logs": logs, "artifacts": artifacts}


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
) -> dict:
    """Collect the workspace and commit the terminal status. Returns the final manifest.

    A cancel requested before this commit wins over a normal ending (spec/format.md).
    """
    refs = ingest_workspace(run, store, exclude=exclude, redactor=redactor, policy=policy)
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

