"""The server's in-memory index of runs, so the runs page does not read every manifest per view.

Built once from a ``list`` taken after the hub's start cursor, then kept current by the hub's one
journal follower: each event re-reads its run's record (or drops the run on ``removed``). Events
between the cursor and the snapshot are applied again, which is harmless: a record is read fresh
each time. Until the snapshot is done (or after the follower lost its place) ``ready`` is False and
readers fall back to a full listing. The rows a page shows are read fresh anyway (pages.py): the
index only decides which runs they are and how many of each status there are.
"""

from __future__ import annotations

import threading

from ..errors import CasrunsError, RunNotFound


def matcher(provider: str | None, q: str | None):
    """The runs table's and the API's ``provider`` (exact) and ``q`` filters, on a manifest or
    a record: ``q`` is a case-insensitive substring of the run id or of a label written
    ``key=value``. None when neither is given."""
    if not provider and not q:
        return None
    needle = (q or "").casefold()

    def where(m: dict) -> bool:
        if provider and m.get("provider") != provider:
            return False
        return not needle or needle in (m.get("run_id") or "").casefold() or any(
            needle in f"{k}={v}".casefold() for k, v in (m.get("labels") or {}).items())

    return where


def slim(record: dict) -> dict:
    """What the runs page filters, counts and sorts on, from a record or a manifest (the fields
    have the same names in both). A full record is ~10 KiB: 10,000 would be most of the memory."""
    return {
        "run_id": record["run_id"], "status": record["status"], "created_at": record.get("created_at"),
        "labels": record.get("labels") or {}, "provider": record.get("provider"),
        "retention": {"promoted": bool((record.get("retention") or {}).get("promoted"))},
    }


class RunIndex:
    def __init__(self, registry) -> None:
        self.registry = registry
        self.records: dict[str, dict] = {}
        self.ready = False
        self.position = ""  # the cursor of the last event applied (cursors compare as strings)
        self.lock = threading.Lock()
        self.moved = threading.Condition(self.lock)

    def rebuild(self) -> None:
        """Read every run (the hub calls this in its thread, after fixing its start cursor)."""
        self.ready = False
        # from the manifests, not from records: building 10,000 full records at once costs the
        # server ~130 MiB that Python keeps afterwards
        records = {m["run_id"]: slim(m) for m in self.registry.iter_manifests()}
        with self.lock:
            self.records = records
            self.ready = True

    def invalidate(self) -> None:
        self.ready = False

    def at(self, cursor: str) -> None:
        """The follower has applied everything up to ``cursor``."""
        with self.moved:
            self.position = cursor
            self.moved.notify_all()

    def caught_up(self, cursor: str, timeout: float = 0.5) -> bool:
        """Wait (briefly) until every event before ``cursor`` is applied: a page shows what a
        command that returned before it was asked already did (read your writes)."""
        with self.moved:
            return self.moved.wait_for(lambda: self.ready and self.position >= cursor, timeout)

    def apply(self, event: dict) -> None:
        rid = event.get("run_id")
        if rid and self.ready:
            self._apply(rid, event)
        self.at(event["cursor"])

    def _apply(self, rid: str, event: dict) -> None:
        if event.get("type") == "removed":
            with self.lock:
                self.records.pop(rid, None)
            return
        try:
            record = self.registry.get(rid, reap=False)
        except RunNotFound:
            with self.lock:
                self.records.pop(rid, None)
            return
        except CasrunsError:
            return  # unreadable now: the next event or a rebuild tells
        with self.lock:
            self.records[rid] = slim(record)

    def snapshot(self, cursor: str | None = None) -> list[dict] | None:
        """Every indexed record, newest first (as ``list`` orders them); None when not ready, or
        when it has not applied the events before ``cursor`` within half a second."""
        if not self.ready or (cursor is not None and not self.caught_up(cursor)):
            return None
        with self.lock:
            rows = list(self.records.values())
        rows.sort(key=lambda r: (r.get("created_at") or "", r["run_id"]), reverse=True)
        return rows
