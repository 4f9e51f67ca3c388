"""``archive push DEST --watch``: push runs to an archive as they finish or get promoted.

Follows the event journal (spec/events.md) instead of a cron job: each event that leaves a run
finished (a terminal ``status``, a deferred collection stored, a promotion, an unpromotion, a
retention change) pushes that run (``--promoted``: only promoted runs, plus an unpromoted one
again, so the archive's manifest reflects the change). The cursor it reached is kept per
archive in ``<root>/archive-watch/<hash of the archive URL>.json`` and written after every push,
so a watcher that is stopped or killed resumes where it was: a run pushed twice costs only its
manifest (the archive already holds its blobs). The first start, or a cursor that expired,
catches up with one ordinary push of every run that qualifies.
"""

from __future__ import annotations

import hashlib
import json
import os

from . import fsutil, query
from . import manifest as mf
from .archive import JOBS, open_remote, push
from .errors import CasrunsError, CursorExpired, InvalidInput, RunNotFound
from .runs import journal_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .root import RegistryRoot

PUSH_ON = frozenset(("status", "promoted", "unpromoted", "retention_changed", "updated"))


def state_path(registry: "RegistryRoot", url: str) -> str:
    return os.path.join(registry.root, "archive-watch", hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")


def qualifies(event: dict, promoted: bool) -> bool:
    run = event.get("run") or {}
    if event.get("type") not in PUSH_ON or run.get("status") not in mf.TERMINAL:
        return False
    if event["type"] == "updated" and not {"logs", "artifacts", "collection_pending"} & set((event.get("detail") or {}).get("fields") or ()):
        return False
    return not promoted or bool(run.get("promoted")) or event["type"] == "unpromoted"


def watch(registry: "RegistryRoot", dest: str, *, promoted: bool = False, timeout: float | None = None, jobs: int = JOBS,
          on_push=None) -> dict:
    """Push qualifying runs until ``timeout`` (None: until interrupted). ``on_push(report)`` is
    called after each push. Returns a summary report (``casruns/archive-watch/v1``)."""
    registry.ensure()
    url = open_remote(dest, registry).url
    path = state_path(registry, url)
    state = _load(path)
    summary = {"schema": "casruns/archive-watch/v1", "dest": url, "pushed": [], "skipped": [], "caught_up": 0, "cursor": None}
    cursor = state.get("cursor") if state.get("dest") == url else None
    if cursor is not None:
        try:
            journal_of(registry.runs_dir).position_of(cursor)
        except (CursorExpired, InvalidInput):
            cursor = None  # expired (or from a registry this one replaced): catch up instead
    if cursor is None:
        cursor = _catch_up(registry, dest, promoted, jobs, summary, on_push)
        _save(path, url, cursor)
    try:
        for event in registry.events(since=cursor, follow=True, timeout=timeout):
            cursor = event["cursor"]
            if not qualifies(event, promoted):
                continue
            rid = event["run_id"]
            try:
                report = push(registry, dest, [rid], jobs=jobs)
            except (InvalidInput, RunNotFound) as e:  # not pushable now (output still pending, removed): a later event tells
                summary["skipped"].append({"run_id": rid, "code": e.code, "message": e.message})
                continue
            summary["pushed"].append(rid)
            _save(path, url, cursor)
            if on_push is not None:
                on_push({**report, "run_id": rid, "cursor": cursor})
    except CursorExpired:
        _save(path, url, None)  # gc removed what we had not read: the next start catches up
        raise
    _save(path, url, cursor)
    summary["cursor"] = cursor
    return summary


def _catch_up(registry, dest, promoted, jobs, summary, on_push) -> str:
    cursor = registry.events_cursor()  # before the list: every later change is in the stream
    ids = []
    for r in query.list_runs(registry, promoted=True if promoted else None):
        try:
            if r["terminal"] and not registry.run_dir(r["run_id"]).read().get("collection_pending"):
                ids.append(r["run_id"])
        except CasrunsError:
            continue
    if ids:
        report = push(registry, dest, ids, jobs=jobs)
        summary["caught_up"] = report["runs"]
        if on_push is not None:
            on_push({**report, "run_id": None, "cursor": cursor})
    return cursor


def _load(path: str) -> dict:
    try:
        doc = json.loads(fsutil.read_regular(path, 64 * 1024))
    except (OSError, ValueError):
        return {}
    except Exception:  # a stray or damaged state file: start over with a catch-up (nothing is lost)
        return {}
    return doc if isinstance(doc, dict) else {}


def _save(path: str, url: str, cursor: str | None) -> None:
    fsutil.ensure_dir(os.path.dirname(path))
    fsutil.atomic_write(path, json.dumps({"schema": "casruns/archive-watch-state/v1", "dest": url, "cursor": cursor}).encode())
