"""Actions on a run's record: cancel, promote and unpromote (with plugin veto and history),
retain. Each is one locked read-modify-write of the manifest."""

from __future__ import annotations

import os

from . import fsutil, locking, recovery, scheduler
from . import manifest as mf
from . import query
from .errors import InvalidInput
from .timefmt import format_ts, now_ts, parse_duration, parse_ts

TYPE_CHECKING = False  # typing costs 3 ms on the status path
if TYPE_CHECKING:
    from .root import RegistryRoot



def cancel(reg: "RegistryRoot", run_id: str, *, reason: str | None = None) -> tuple[dict, str]:
    """Cancel a run. Returns (record, outcome) with outcome one of
    ``cancelled`` (was queued: done now), ``requested`` (active: the supervisor stops it),
    ``already_requested`` or ``already_terminal`` (nothing changed)."""
    run = reg.run_dir(run_id)
    query.manifest(reg, run_id)
    reason = reg.redactor().text(reason or "cancelled by user")  # stored and journaled: masked like a promotion's reason
    with run.update() as m:
        if m["status"] in mf.TERMINAL:
            outcome = "already_terminal"
        elif m.get("cancel"):
            outcome = "already_requested"
        else:
            m["cancel"] = {"requested_at": now_ts(), "reason": reason}
            if m["status"] == mf.QUEUED:
                mf.transition(m, mf.CANCELLED, now_ts())
                m["error"] = {"code": "cancelled", "message": reason}
                outcome = "cancelled"
            else:
                outcome = "requested"
        sup = m.get("supervisor") or {}
    if outcome in ("cancelled", "requested", "already_requested"):
        # after the commit: the marker never runs ahead of the record; touched again on a
        # repeated cancel, in case the first one died between its commit and this line
        fsutil.touch(run.cancel_path)
    if outcome == "cancelled":
        scheduler.dequeue(reg.root, run_id)
    if outcome in ("cancelled", "requested", "already_requested") and locking.process_matches(sup.get("pid"), sup.get("start_time"), sup.get("boot_id")):
        try:
            os.kill(sup["pid"], __import__("signal").SIGUSR1)  # wake it; it reads the marker
        except OSError:
            pass
    if outcome == "requested" and recovery.is_lost(reg, run, run.read_fresh()):
        recovery.reap_lost(reg, run)
    return query.get(reg, run_id), outcome


def promote(reg: "RegistryRoot", run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
    """Mark a terminal run as accepted evidence. Returns (record, outcome) with outcome
    ``promoted`` or ``already_promoted``. Plugins may veto (PluginError, nothing changes)
    or add metadata to the promotion entry."""
    return _set_promotion(reg, run_id, True, reason=reason, by=by)


def unpromote(reg: "RegistryRoot", run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
    """Reverse a promotion; the history of both stays in the manifest."""
    return _set_promotion(reg, run_id, False, reason=reason, by=by)


def _set_promotion(reg: "RegistryRoot", run_id: str, promoted: bool, *, reason: str, by: str | None) -> tuple[dict, str]:
    from .errors import InvalidTransition, PluginError

    if not reason or not reason.strip():
        raise InvalidInput("--reason is required and must not be empty")
    record = query.get(reg, run_id)
    if not record["terminal"]:
        raise InvalidTransition(f"run {run_id} is {record['status']}; only a finished run can be promoted", run_id=run_id)
    if record["retention"]["promoted"] == promoted:
        return record, "already_promoted" if promoted else "not_promoted"
    metadata: dict = {}
    if promoted:
        for plugin, res in reg.plugins.call("casruns_promote", run=record, reason=reason, by=by):
            if not isinstance(res, dict):
                continue
            if res.get("veto"):
                raise PluginError(f"plugin {plugin} vetoed the promotion: {res['veto']}", plugin=plugin, hook="casruns_promote")
            metadata.update(res.get("metadata") or {})
    redactor = reg.redactor()
    entry = {
        "action": "promote" if promoted else "unpromote",
        "at": now_ts(),
        "reason": redactor.text(reason),
        "by": redactor.text(by) if by else None,
        "metadata": redactor.metadata(mf.jsonable(metadata)) or None,
    }
    with reg.run_dir(run_id).update() as m:
        ret = m.setdefault("retention", {})
        if bool(ret.get("promoted")) == promoted:
            outcome = "already_promoted" if promoted else "not_promoted"
        else:
            ret["promoted"] = promoted
            ret.setdefault("history", []).append(entry)
            m["updated_at"] = entry["at"]
            outcome = "promoted" if promoted else "unpromoted"
    return query.get(reg, run_id), outcome


def retain(reg: "RegistryRoot", run_id: str, *, for_: str | float | None = None, until: str | None = None) -> dict:
    """Override a run's retention: keep it ``for_`` long after it finished, or ``until`` a time."""
    if (for_ is None) == (until is None):
        raise InvalidInput("give exactly one of --for DURATION or --until TIME")
    with reg.run_dir(run_id).update() as m:
        ret = m.setdefault("retention", {})
        if for_ is not None:
            ret["retain_for"] = parse_duration(for_)
            ret.pop("retain_until", None)
        else:
            ret["retain_until"] = format_ts(parse_ts(until))
            ret.pop("retain_for", None)
        m["updated_at"] = now_ts()
    return query.get(reg, run_id)
