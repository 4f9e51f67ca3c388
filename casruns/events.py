"""What an event is: the changes to a run that the journal reports, built from the manifest
before and after one committed update (schema ``casruns/event/v1``, spec/events.md).

One locked update of a manifest yields one or more events, in this order: ``cancel_requested``,
``status``, ``salvaged``, ``promoted``/``unpromoted``, ``retention_changed``; a change that is
none of these is ``updated`` (naming the fields). Creating a run is ``created``; gc removing
it is ``removed``. Every event carries a small summary of the run as it stands after the
change, so a consumer rarely needs a second call. Pure functions: no I/O.
"""

from __future__ import annotations

from .manifest import TERMINAL
from .timefmt import now_ts

SCHEMA = "casruns/event/v1"
TYPES = ("created", "status", "cancel_requested", "promoted", "unpromoted", "retention_changed", "salvaged", "removed", "updated")
# fields whose change is told by a typed event (or is bookkeeping), not by `updated`
_TOLD = frozenset(("status", "cancel", "salvaged", "retention", "updated_at", "event_seq", "incarnation"))


def summary(m: dict) -> dict:
    return {
        "status": m.get("status"),
        "labels": dict(m.get("labels") or {}),
        "provider": m.get("provider"),
        "attempt": m.get("attempt", 1),
        "promoted": bool((m.get("retention") or {}).get("promoted")),
        "created_at": m.get("created_at"),
        "started_at": m.get("started_at"),
        "finished_at": m.get("finished_at"),
    }


def _event(m: dict, type_: str, now: str, *, old_status: str | None = None, detail: dict | None = None) -> dict:
    terminal = m.get("status") in TERMINAL
    return {
        "schema": SCHEMA,
        "run_id": m["run_id"],
        "incarnation": m.get("incarnation", ""),
        "seq": 0,  # numbered by the writer, in the same locked update
        "type": type_,
        "time": now,
        "old_status": old_status,
        "new_status": m.get("status"),
        "exit_code": m.get("exit_code") if terminal else None,
        "error": dict(m["error"]) if m.get("error") and (terminal or type_ == "status") else None,
        "recovered": False,
        "run": summary(m),
        "detail": detail or {},
    }


def created(m: dict) -> list[dict]:
    detail = {k: m[k] for k in ("replay_of", "resumed_from") if m.get(k)}
    return [_event(m, "created", m.get("created_at") or now_ts(), detail=detail)]


def removed(m: dict, reason: str) -> list[dict]:
    return [_event(m, "removed", now_ts(), old_status=m.get("status"), detail={"reason": reason})]


def changes(old: dict, new: dict) -> list[dict]:
    """The events that the committed update ``old`` → ``new`` of one manifest stands for."""
    now = now_ts()
    out = []
    if new.get("cancel") and not old.get("cancel"):
        out.append(_event(new, "cancel_requested", now, old_status=old.get("status"), detail={"reason": new["cancel"].get("reason")}))
    if old.get("status") != new.get("status"):
        out.append(_event(new, "status", now, old_status=old.get("status")))
    if new.get("salvaged") and not old.get("salvaged"):
        out.append(_event(new, "salvaged", now, old_status=old.get("status"),
                          detail={"collection_pending": bool(new.get("collection_pending"))}))
    before, after = old.get("retention") or {}, new.get("retention") or {}
    if bool(before.get("promoted")) != bool(after.get("promoted")):
        entry = (after.get("history") or [{}])[-1]
        detail = {k: entry.get(k) for k in ("reason", "by", "metadata") if entry.get(k) is not None}
        out.append(_event(new, "promoted" if after.get("promoted") else "unpromoted", now, detail=detail))
    keys = ("retain_for", "retain_until")
    if any(before.get(k) != after.get(k) for k in keys):
        out.append(_event(new, "retention_changed", now, detail={k: after.get(k) for k in keys}))
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _TOLD)
    if fields and not any(e["type"] == "status" for e in out):
        out.append(_event(new, "updated", now, detail={"fields": fields}))
    if not out:  # only bookkeeping changed: still a committed change, still reported
        out.append(_event(new, "updated", now, detail={"fields": sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))}))
    return out


def number(events: list[dict], m: dict) -> None:
    """Give the events their per-run sequence numbers and record the last in the manifest."""
    seq = int(m.get("event_seq") or 0)
    for e in events:
        seq += 1
        e["seq"] = seq
        e["incarnation"] = m.get("incarnation", "")
    m["event_seq"] = seq


def matches(event: dict, *, run_ids=None, labels=None, types=None) -> bool:
    """The ``events`` filters: any of the run ids, all of the labels, any of the types (a
    status name matches the ``status`` events into it, and ``created`` events in it)."""
    if run_ids and event.get("run_id") not in run_ids:
        return False
    if labels:
        have = (event.get("run") or {}).get("labels") or {}
        if any(have.get(k) != v for k, v in labels.items()):
            return False
    if types:
        t = event.get("type")
        if t not in types and not (t in ("status", "created") and event.get("new_status") in types):
            return False
    return True


def line(event: dict) -> str:
    """One readable line: cursor, time, run, what happened."""
    t = event.get("type")
    what = t
    if t in ("status", "salvaged"):
        what = f"{t} {event.get('old_status')} -> {event.get('new_status')}"
    elif t == "removed":
        what = f"removed (was {event.get('old_status')})"
    elif t == "created":
        what = f"created {event.get('new_status')}"
    elif t == "updated":
        what = "updated " + ",".join((event.get("detail") or {}).get("fields") or [])
    extra = []
    if t == "status" and event.get("exit_code") is not None:
        extra.append(f"exit {event['exit_code']}")
    if t == "status" and event.get("error"):
        extra.append(f"error {event['error'].get('code')}")
    if event.get("recovered"):
        extra.append("recovered")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{event.get('cursor', '')}  {event.get('time')}  {event.get('run_id')}#{event.get('seq')}  {what}{tail}"
