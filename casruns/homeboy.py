"""Homeboy's run record (``homeboy/run-lifecycle-record/v1``) from casruns' run record or an event.

Homeboy, the fleet orchestrator casruns serves, keeps a typed record of every run it drives;
``status``/``list --format homeboy`` print it and the events command maps each event to it.
spec/homeboy.md is the contract (the mapping field by field, and why); the JSON Schema the
tests validate against is tests/schemas/homeboy-run-lifecycle-record.v1.schema.json.

Pure functions on plain dicts, no I/O: this module sits on the click-free status fast path,
so it imports nothing but the status table.
"""

from __future__ import annotations

from . import manifest as mf

SCHEMA = "homeboy/run-lifecycle-record/v1"
BACKEND = "casruns"  # provider_runtime.backend when the run names no provider

# casruns status -> (execution.state, provider_runtime.state); spec/homeboy.md, "States".
# A failed or timed-out run with stored artifact files becomes partial_recoverable (from_record).
STATES: dict[str, tuple[str, str]] = {
    mf.QUEUED: ("queued", "not_started"),
    mf.BOOTING: ("running", "running"),
    mf.RUNNING: ("running", "running"),
    mf.COLLECTING: ("running", "running"),
    mf.SUCCEEDED: ("succeeded", "succeeded"),
    mf.FAILED: ("failed", "failed"),
    mf.TIMED_OUT: ("failed", "timed_out"),
    mf.CANCELLED: ("cancelled", "cancelled"),
}
UNKNOWN = ("unknown", "unknown")

# Run error codes under which a run may have ended with its output still in its workspace
# (``collection_pending``: a full disk, an unstorable spool, a salvage that could not store).
_DEFERRING_CODES = frozenset({"no_space", "collect_failed", "supervisor_lost"})

CLEANUP_POLICY = "casruns removes the run's workspace (spool, artifact directory) once its output is stored"


def from_record(record: dict, *, stale_after_seconds: int | None = None) -> dict:
    """The Homeboy record of a ``casruns/run/v1`` record (what ``status --json`` prints).

    :param stale_after_seconds: the registry's ``lost_after`` in whole seconds (rounded up):
        reported in ``heartbeat`` while the run is active; None leaves it out.
    """
    status = record.get("status")
    rid = record["run_id"]
    terminal = status in mf.TERMINAL
    exec_state, provider_state = STATES.get(status, UNKNOWN)
    arts = record.get("artifacts")
    has_files = bool(arts) and (arts.get("files") or 0) > 0
    if status in (mf.FAILED, mf.TIMED_OUT) and has_files:
        exec_state = "partial_recoverable"
    pending = _output_pending(record)
    retention = record.get("retention") or {}
    updated = record.get("updated_at")

    ids = _external_ids(rid, record.get("provider"), record.get("runtime"), record.get("preview"))
    meta = _metadata(record, status)
    meta["runtime"] = dict(record.get("runtime") or {})
    meta["preview"] = dict(record.get("preview") or {})
    meta["artifacts"] = arts
    meta["collection_pending"] = pending
    meta["retention"] = {k: retention.get(k) for k in ("promoted", "rule", "retain_until", "cleanup_eligible", "cleanup_eligible_at")}
    has_logs = any((record.get("logs") or {}).values())

    doc: dict = {"schema": SCHEMA, "execution": _execution(exec_state, record, updated)}
    doc["provider_runtime"] = [_provider(rid, record.get("provider"), provider_state, ids, meta, stream=not terminal or has_logs)]
    beat = record.get("heartbeat_at")
    if beat:
        hb: dict = {"last_seen_at": beat}
        if stale_after_seconds is not None and status in mf.ACTIVE:
            hb["stale_after_seconds"] = int(stale_after_seconds)
        doc["heartbeat"] = hb
    doc["cleanup"] = _cleanup(status, pending, record.get("finished_at"))
    doc["finalization"] = {"state": "not_requested"}
    doc["artifact_retention"] = _record_retention(record, status, arts, pending, retention)
    doc["external_runtime_ids"] = list(ids)  # the union over the one provider entry
    if updated:
        doc["updated_at"] = updated
    return doc


def from_event(event: dict, *, stale_after_seconds: int | None = None) -> dict:
    """The Homeboy record as of a ``casruns/event/v1`` event, from what its run summary holds.

    Fields the summary cannot fill are left out (heartbeat) or say ``unknown``; a failed run is
    never ``partial_recoverable`` here (the summary has no artifacts): spec/homeboy.md, "Events".
    ``stale_after_seconds`` is accepted for symmetry and unused (an event carries no heartbeat).
    """
    run = event.get("run") or {}
    status = run.get("status")
    rid = event["run_id"]
    etype = event.get("type")
    time = event.get("time")
    exec_state, provider_state = STATES.get(status, UNKNOWN)
    ids = _external_ids(rid, run.get("provider"), None, None)
    summary = {
        "labels": run.get("labels"), "attempt": run.get("attempt"), "exit_code": event.get("exit_code"),
        "error": event.get("error"), "started_at": run.get("started_at"),
    }
    meta = _metadata(summary, status)
    meta["event"] = {"type": etype, "seq": event.get("seq"), "cursor": event.get("cursor"), "recovered": bool(event.get("recovered"))}
    removed = etype == "removed"
    doc: dict = {"schema": SCHEMA, "execution": _execution(exec_state, run, time)}
    doc["provider_runtime"] = [_provider(rid, run.get("provider"), provider_state, ids, meta, stream=not removed)]
    if removed or etype == "salvaged":
        cleanup = {"state": "succeeded", "policy": CLEANUP_POLICY}
        if time:
            cleanup["updated_at"] = time
    elif status in mf.TERMINAL and (event.get("error") or {}).get("code") in _DEFERRING_CODES:
        cleanup = {"state": "unknown", "policy": CLEANUP_POLICY}  # maybe collection_pending: the summary cannot say
    else:
        cleanup = _cleanup(status, False, run.get("finished_at"))
    doc["cleanup"] = cleanup
    doc["finalization"] = {"state": "not_requested"}
    doc["artifact_retention"] = _event_retention(etype, status, run, time)
    doc["external_runtime_ids"] = list(ids)  # the union over the one provider entry
    if time:
        doc["updated_at"] = time
    return doc


# -- the parts ------------------------------------------------------------------------


def _execution(state: str, times: dict, updated) -> dict:
    ex: dict = {"state": state}
    for key in ("started_at", "finished_at"):
        if times.get(key):
            ex[key] = times[key]
    if updated:
        ex["updated_at"] = updated
    return ex


def _provider(rid: str, provider, state: str, ids: list[dict], meta: dict, *, stream: bool) -> dict:
    entry: dict = {"task_id": rid, "backend": provider or BACKEND, "state": state}
    if stream:
        entry["stream_uri"] = f"casruns://runs/{rid}/logs/transcript"
        meta["follow_command"] = f"casruns logs --stream transcript --follow {rid}"
    if meta.get("resumable"):
        meta["resume_command"] = f"casruns resume {rid}"
    entry["external_runtime_ids"] = ids
    entry["metadata"] = meta
    return entry


def _external_ids(rid: str, provider, runtime, preview) -> list[dict]:
    ids = [{"kind": "casruns_run_id", "value": rid, "provider": "casruns"}]
    name = provider or BACKEND
    runtime_id = (runtime or {}).get("id")
    if isinstance(runtime_id, str) and runtime_id:
        ids.append({"kind": "provider_runtime_id", "value": runtime_id, "provider": name})
    url = (preview or {}).get("url")
    if isinstance(url, str) and url:
        ids.append({"kind": "preview_url", "value": url, "provider": name, "url": url})
    return ids


def _metadata(r: dict, status) -> dict:
    meta = {
        "casruns_status": status,
        "labels": dict(r.get("labels") or {}),
        "attempt": r.get("attempt") or 1,
        "exit_code": r.get("exit_code"),
        "signal": r.get("signal"),
        "error": r.get("error"),
        "resumed_from": r.get("resumed_from"),
        "replay_of": r.get("replay_of"),
        "resumable": status in mf.RESUMABLE,
    }
    return meta


def _output_pending(record: dict) -> bool:
    """Whether a terminal run's output still waits in its workspace for ``reap`` to store it
    (``collection_pending``, which the run record does not carry: inferred, spec/homeboy.md)."""
    if "collection_pending" in record:  # a record that carries the flag is believed
        return bool(record["collection_pending"])
    if record.get("status") not in mf.TERMINAL or not record.get("started_at"):
        return False
    if record.get("artifacts") is not None or any((record.get("logs") or {}).values()):
        return False
    return (record.get("error") or {}).get("code") in _DEFERRING_CODES


def _cleanup(status, pending: bool, finished_at) -> dict:
    if status in mf.TERMINAL and not pending:
        out = {"state": "succeeded", "policy": CLEANUP_POLICY}
        if finished_at:
            out["updated_at"] = finished_at
        return out
    if status in mf.STATUS_TABLE:
        return {"state": "pending", "policy": CLEANUP_POLICY}
    return {"state": "unknown", "policy": CLEANUP_POLICY}


def _policy(retention: dict) -> str | None:
    rule = retention.get("rule")
    if not rule:
        return None
    until = retention.get("retain_until")
    return f"{rule} until {until}" if until else rule


def _record_retention(record: dict, status, arts, pending: bool, retention: dict) -> dict:
    if status not in mf.STATUS_TABLE:
        state = "unknown"
    elif status not in mf.TERMINAL or pending:
        state = "pending"
    elif arts and (arts.get("files") or 0) > 0:
        state = "retained"
    elif arts is None and (record.get("error") or {}).get("code") == "collect_failed":
        state = "failed"
    else:
        state = "not_applicable"
    out: dict = {"status": state}
    policy = _policy(retention)
    if policy:
        out["policy"] = policy
    history = retention.get("history") or []
    stamps = [t for t in (record.get("finished_at"), *(h.get("at") for h in history if isinstance(h, dict))) if isinstance(t, str)]
    if stamps and status in mf.TERMINAL:
        out["updated_at"] = max(stamps)
    return out


def _event_retention(etype, status, run: dict, time) -> dict:
    if etype == "removed":
        out = {"status": "not_applicable", "policy": "removed by casruns gc"}
    elif status not in mf.STATUS_TABLE:
        out = {"status": "unknown"}
    elif status not in mf.TERMINAL:
        out = {"status": "pending"}
    elif run.get("promoted"):
        out = {"status": "retained", "policy": "promoted"}
    elif not run.get("started_at"):
        out = {"status": "not_applicable"}  # ended before it started: it never had artifacts
    else:
        out = {"status": "unknown"}  # the summary does not say whether it stored artifacts
    if time and status in mf.TERMINAL:
        out["updated_at"] = time
    return out
