"""Queries: one run's manifest and record, the list of runs, waiting for runs to end.

Building a record reaps a run whose supervisor is provably gone (recovery), so a poller
never sees a dead run "running". On a full disk the record is answered as it stands.
"""

from __future__ import annotations

import time

from collections.abc import Iterable, Mapping
from . import manifest as mf
from . import record as rec
from . import recovery
from .errors import CasrunsError, InvalidInput, RunNotFound, StrayFile
from .ids import validate_run_id
from .runs import RunDir, iter_run_ids
from .timefmt import parse_ts

TYPE_CHECKING = False  # typing costs 3 ms on the status path
if TYPE_CHECKING:
    from .root import RegistryRoot



def manifest(reg: "RegistryRoot", run_id: str) -> dict:
    if not reg.check_format():
        raise RunNotFound(f"no run {validate_run_id(run_id)}: registry {reg.root} does not exist", run_id=run_id)
    return reg.run_dir(run_id).read()


def get(reg: "RegistryRoot", run_id: str, *, reap: bool = True) -> dict:
    """The run's record (``casruns/run/v1``); reaps it first if its supervisor is lost."""
    run = reg.run_dir(run_id)
    m = manifest(reg, run_id)
    kept_by = None
    keep = reg.config.keep_last
    if keep and m["status"] in mf.TERMINAL and any(k in (m.get("labels") or {}) for k in keep):
        import time

        from .retention import record_until

        until = record_until(m, reg.config)
        if until is not None and until[1] <= time.time() and not (m.get("retention") or {}).get("promoted"):
            # only a run whose time is up by its record can be kept by keep-last (gc's own hold
            # may still run), and knowing whether it is needs every run: status pays that only
            # then. The same rule as list's, so both show the same retention.rule.
            kept_by = reg.keep_last_protected().get(run_id)
    return record(reg, run, m, reap=reap, kept_by=kept_by)


def record(reg: "RegistryRoot", run: RunDir, m: dict, *, reap: bool = True, kept_by: str | None = None) -> dict:
    hb = act = None
    if m["status"] not in mf.TERMINAL:
        reaped = None
        if reap and m["status"] in mf.ACTIVE and recovery.is_lost(reg, run, m):
            try:
                reaped = recovery.reap_lost(reg, run)
            except (CasrunsError, OSError):
                # a read never needs to write: on a full disk, a read-only snapshot, or with a
                # workspace that cannot be collected, answer with the record as it stands (the
                # next reap with room or write access ends the run)
                pass
        if reaped is not None:
            m = reaped
        else:
            hb = run.mtime("heartbeat")
            act = run.last_activity()
    return rec.build(m, reg.config, heartbeat=hb, activity=act, kept_by=kept_by)


def list_runs(reg: "RegistryRoot", *,
    statuses: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    since: str | None = None,
    limit: int | None = None,
    promoted: bool | None = None,
    reap: bool = True,
    errors: list | None = None,
    before: tuple[str, str] | None = None,
    where=None,
) -> list[dict]:
    """Records newest first, filtered by status (any of), labels (all of), creation time.

    ``before`` (a ``(created_at, run_id)`` key) keeps only runs that sort after it (the next
    page of a listing); ``where(manifest)`` is one more filter on the manifest, applied with
    the others before any record is built.
    """
    flt = ListFilter(statuses=statuses, labels=labels, since=since, limit=limit, promoted=promoted)
    if not reg.check_format():
        return []
    found: list[tuple[str, str, RunDir, dict]] = []
    everything: list[dict] = []
    for rid in iter_run_ids(reg.runs_dir):
        run = reg.run_dir(rid)
        try:
            m = run.read()
        except (RunNotFound, StrayFile):
            continue  # removed while we listed; or a stray, which readers skip (verify reports it)
        except CasrunsError as e:
            # one unreadable manifest must not hide every other run
            if errors is not None:
                errors.append({"run_id": rid, "code": e.code, "message": e.message})
            continue
        everything.append(m)
        if not flt.manifest_matches(m):
            continue
        if before is not None and (m.get("created_at", ""), rid) >= before:
            continue
        if where is not None and not where(m):
            continue
        found.append((m.get("created_at", ""), rid, run, m))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    from .retention import keep_last_protected

    kept = keep_last_protected(everything, reg.config)
    out = []
    for _, _, run, m in found:
        try:
            r = record(reg, run, m, reap=reap, kept_by=kept.get(m["run_id"]))
        except CasrunsError as e:  # a malformed field in one manifest hides only that run
            if errors is not None:
                errors.append({"run_id": m["run_id"], "code": "manifest_corrupt", "message": e.message})
            continue
        if flt.statuses and r["status"] not in flt.statuses:
            continue
        out.append(r)
        if flt.limit is not None and len(out) >= flt.limit:
            break
    return out


class ListFilter:
    """The filters of ``list`` (and of ``archive list``), checked once: status (any of, judged
    on the record, so after a reap), labels (all of), created since, promoted, and a limit."""

    def __init__(self, *, statuses: Iterable[str] = (), labels: Mapping[str, str] | None = None, since: str | None = None,
                 limit: int | None = None, promoted: bool | None = None) -> None:
        self.statuses = set(statuses)
        for s in self.statuses:
            if s not in mf.STATUSES:
                raise InvalidInput(f"unknown status {s!r}; one of: {', '.join(mf.STATUSES)}")
        if limit is not None and limit < 0:
            raise InvalidInput("--limit must not be negative")
        self.labels = dict(labels or {})
        self.limit, self.promoted = limit, promoted
        self.since_ts = None
        if since:
            from .timefmt import parse_time_or_ago

            self.since_ts = parse_time_or_ago(since)

    def manifest_matches(self, m: dict) -> bool:
        """The filters a manifest answers (all but status)."""
        if self.labels and any((m.get("labels") or {}).get(k) != v for k, v in self.labels.items()):
            return False
        if self.since_ts is not None and parse_ts(m.get("created_at") or "1970-01-01T00:00:00Z") < self.since_ts:
            return False
        return self.promoted is None or bool((m.get("retention") or {}).get("promoted")) == self.promoted


def wait(reg: "RegistryRoot", run_ids: list[str], *, timeout: float | None = None, poll: float | None = None) -> tuple[list[dict], bool]:
    """Block until every run is terminal. Returns (records, all_terminal).

    Sleeps on a watch of the runs' directories (``notify``): a manifest renamed into place
    wakes it at once. ``poll`` is the most seconds between two checks (None, and at most:
    ``notify.RECHECK``): a supervisor that died makes no filesystem event, so lost runs are
    looked for that often.
    """
    from . import notify

    for rid in run_ids:
        manifest(reg, rid)  # unknown ids fail before we wait
    deadline = None if timeout is None else time.monotonic() + timeout
    last_check = 0.0
    with notify.watch([reg.run_dir(rid).path for rid in run_ids]) as watch:
        while True:
            records = [get(reg, rid) for rid in run_ids]
            if all(r["terminal"] for r in records):
                return records, True
            if time.monotonic() - last_check > 5.0:
                # A queued run whose supervisor is gone would never end: restart it (or fail
                # it, if it cannot be restarted safely) as reap would, so wait always returns.
                last_check = time.monotonic()
                for r in records:
                    run = reg.run_dir(r["run_id"])
                    if r["status"] == mf.QUEUED and not run.is_supervised():
                        time.sleep(0.05)  # the submitter hands its lock over; look twice
                        if not run.is_supervised() and run.read_fresh()["status"] == mf.QUEUED:
                            recovery.restart_queued(reg, run, run.read_fresh())
            step = notify.RECHECK if poll is None else min(poll, notify.RECHECK)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return records, False
                step = min(step, left)
            watch.wait(step)
