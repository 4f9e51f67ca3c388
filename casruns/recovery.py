"""Recovery: what a crash leaves behind, found and repaired.

A run whose supervisor is provably gone (its ``supervisor.lock`` is free, or on another host
its heartbeat is silent past ``lost_after``) is *lost*: reaping kills what is left of its
command, salvages the spooled output and ends it. A queued run whose supervisor died is
restarted (at most ``MAX_RESTARTS`` times) or failed when it cannot be restarted exactly.
Leftovers of crashed writers (``runs/.new-*``, ``.tmp-*``) are removed once their writer is
gone. Terminal runs whose collection was deferred by a full disk are collected.
"""

from __future__ import annotations

import json
import os
import time

from . import fsutil, locking, scheduler
from . import manifest as mf
from .errors import CasrunsError
from .runs import RunDir, iter_run_ids
from .timefmt import now_ts, parse_ts

TYPE_CHECKING = False  # typing costs 3 ms on the status path
if TYPE_CHECKING:
    from .root import RegistryRoot

MAX_RESTARTS = 3  # a queued run whose supervisor died this often before starting it is failed


def is_lost(reg: "RegistryRoot", run: RunDir, m: dict) -> bool:
    """True if the run's supervisor is provably gone (or silent too long on another host)."""
    if run.is_supervised():
        return False
    sup = m.get("supervisor") or {}
    if sup.get("host") and sup.get("host") != locking.hostname():
        hb = run.mtime("heartbeat") or 0.0
        return time.time() - hb > reg.config.lost_after
    return True


def reap_lost(reg: "RegistryRoot", run: RunDir) -> dict:
    """End an active run whose supervisor is gone: kill leftovers, salvage, mark failed."""
    from . import collect

    with run.locked():
        m = run.read_fresh()
        if m["status"] not in mf.ACTIVE or not is_lost(reg, run, m):
            return m
        proc = m.get("process") or {}
        # Kill what is left of the command: its group, if the leader is provably ours,
        # else each member of that group that started after it (the leader may be gone).
        if locking.process_matches(proc.get("pid"), proc.get("start_time"), proc.get("boot_id")):
            _kill([proc["pgid"]], group=True)
        elif proc.get("pgid") and proc.get("start_time") is not None:
            _kill(locking.group_members(proc["pgid"], proc["start_time"], proc.get("boot_id")), group=False)
    sup = m.get("supervisor") or {}
    deadline = m.get("deadline_at")
    if deadline and time.time() >= parse_ts(deadline):
        status, error = mf.TIMED_OUT, {"code": "timeout", "message": "the run exceeded its timeout and its supervisor is gone"}
    else:
        status = mf.FAILED
        error = {
            "code": "supervisor_lost",
            "message": f"the supervisor (pid {sup.get('pid', '?')} on {sup.get('host', '?')}) is gone; "
            "output captured until then was salvaged",
        }
    salvaged = {"salvaged": {"at": now_ts(), "by": "reap", "host": locking.hostname(), "pid": os.getpid()}}
    try:
        # a salvage still passes artifacts and their names through today's detectors
        return collect.finish(
            run, reg.store, status, error=error, artifacts=not _declared_secrets(m),
            redactor=reg.redactor(), policy=reg.config.artifact_policy, extra=salvaged,
        )
    except (CasrunsError, OSError) as e:
        # the output cannot be stored now (a full disk, a stray in the way): end the run anyway,
        # keep the workspace, and store it at a later reap (collection_pending)
        why = "the disk is full" if fsutil.is_no_space(e) else f"{type(e).__name__}: {getattr(e, 'message', e)}"
        error = {**error, "message": error["message"].replace("was salvaged", f"is kept in the workspace until reap can store it ({why})")}
    return collect.finish_deferred(run, status, error=error, extra=salvaged)


def settle_events(reg: "RegistryRoot") -> int:
    """Publish (marked recovered) or drop every pending event whose writer is gone."""
    from .runs import committed, journal_of

    runs_dir = reg.runs_dir
    journal = journal_of(runs_dir)
    journal.clean_temps()
    return journal.resolve(lambda doc: committed(runs_dir, doc))


def reap(reg: "RegistryRoot") -> dict:
    """Find every run whose supervisor is gone: end active ones, restart queued ones."""
    report = {
        "schema": "casruns/reap/v1", "reaped": [], "restarted": [], "failed": [], "queue_repaired": 0, "cleaned": 0,
        "collected": [], "pending": [],
    }
    if not reg.check_format():
        return report
    report["cleaned"] = clean_leftovers(reg)
    # events whose writer died between its commit and its journal append (spec/events.md)
    report["events_settled"] = settle_events(reg)
    queued_entries = set(scheduler.queued_run_ids(reg.root))
    for rid in iter_run_ids(reg.runs_dir):
        run = reg.run_dir(rid)
        try:
            m = run.read_fresh()
        except Exception:
            continue
        status = m["status"]
        if status in mf.TERMINAL and m.get("collection_pending"):
            # a run that ended on a full disk: store its spooled output now, if there is room
            from . import collect

            try:
                done = collect.complete_pending(
                    run, reg.store, artifacts=not _declared_secrets(m), redactor=reg.redactor(), policy=reg.config.artifact_policy,
                )
                if done is not None:
                    report["collected"].append(rid)
            except (CasrunsError, OSError):
                report["pending"].append(rid)  # still full, or still a stray in the way: the workspace stays
            continue
        if status in mf.TERMINAL:
            if os.path.lexists(run.spool_dir) or os.path.lexists(run.artifacts_dir):
                run.remove_workspace()  # a crash between the terminal commit and cleanup
                report["cleaned"] += 1
            if rid in queued_entries:
                scheduler.dequeue(reg.root, rid)
                report["queue_repaired"] += 1
            continue
        if status in mf.ACTIVE:
            if is_lost(reg, run, m):
                try:
                    final = reap_lost(reg, run)
                except (CasrunsError, OSError) as e:
                    # one run that cannot be ended now must not stop reap for all the others
                    report.setdefault("errors", []).append({"run_id": rid, "code": getattr(e, "code", "registry_error"), "message": str(getattr(e, "message", e))})
                    continue
                report["reaped"].append({"run_id": rid, "status": final["status"]})
            continue
        # queued
        if run.is_supervised():
            continue
        if rid not in queued_entries:
            scheduler.enqueue(reg.root, rid, int(m.get("created_ns") or 0))
            report["queue_repaired"] += 1
        if restart_queued(reg, run, m):
            report["restarted"].append(rid)
        else:
            report["failed"].append(rid)
    return report


def clean_leftovers(reg: "RegistryRoot", grace: float = 3600.0) -> int:
    """Remove what crashed writers left: half-created run directories (``runs/.new-*``)
    and temp files of atomic writes (``.tmp-*``). Each name carries its writer's pid: an
    entry is removed only when that process is gone and the entry is older than
    ``grace`` (and never less than a minute, whatever gc_grace says)."""
    import shutil

    removed = 0
    cutoff = time.time() - max(grace, 60.0)

    def abandoned(path: str, name: str) -> bool:
        if fsutil.writer_alive(name):  # names end in -<pid>-<random> (fsutil.temp_name)
            return False
        try:
            return os.lstat(path).st_mtime < cutoff
        except OSError:
            return False

    for name in os.listdir(reg.runs_dir) if os.path.isdir(reg.runs_dir) else []:
        path = os.path.join(reg.runs_dir, name)
        if name.startswith((".new-", ".tmp-")):
            if abandoned(path, name):
                try:
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
                    removed += 1
                except OSError:
                    pass
        elif os.path.isdir(path) and not os.path.islink(path):
            try:
                inner_names = os.listdir(path)
            except OSError:
                continue  # renamed away (gc's trash) or removed while we looked
            for inner in inner_names:
                ipath = os.path.join(path, inner)
                if inner.startswith(".tmp-") and abandoned(ipath, inner):
                    try:
                        os.unlink(ipath)
                        removed += 1
                    except OSError:
                        pass
    # temps of the registry id (at the root) and of the journal's reserves (in events/)
    for where, prefix in ((reg.root, ".tmp-registry-id-"), (os.path.join(reg.root, "events"), ".tmp-")):
        for name in os.listdir(where) if os.path.isdir(where) else []:
            path = os.path.join(where, name)
            if name.startswith(prefix) and abandoned(path, name) and not os.path.isdir(path):
                fsutil.unlink_quiet(path)
                removed += 1
    return removed


def restart_queued(reg: "RegistryRoot", run: RunDir, m: dict) -> bool:
    """Start a new supervisor for a queued run that never ran. Secret values were held
    only in the lost supervisor's memory, so a run that needs them ends failed."""
    from . import handover

    lock = locking.FileLock(run.supervisor_lock_path, record=True)
    if not lock.acquire(blocking=False, timeout=0.2):  # a probe holds it shared for an instant
        return True  # someone else restarted it
    try:
        req = m.get("request") or {}
        if req.get("secret_env") or req.get("argv_redacted") or req.get("argv_lossy") or req.get("env_redacted") or req.get("cwd_redacted"):
            with run.update() as mm:
                if mm["status"] == mf.QUEUED:
                    mm["error"] = {
                        "code": "supervisor_lost",
                        "message": "the queued run's supervisor is gone and its secret values were held only in memory; replay it",
                    }
                    mf.transition(mm, mf.FAILED, now_ts())
            scheduler.dequeue(reg.root, run.run_id)
            return False
        try:
            doc = json.loads(fsutil.read_regular(run.file("env.json"), 16 << 20))
            env, umask = doc["env"], int(doc.get("umask", 0o077))  # casruns 0.2 wrote no umask: private
        except (OSError, ValueError, KeyError, TypeError, CasrunsError):
            # never run it with an environment other than the one it was submitted with
            with run.update() as mm:
                if mm["status"] == mf.QUEUED:
                    mm["error"] = {"code": "supervisor_lost", "message": "the queued run's supervisor is gone and its environment record is missing; replay it"}
                    mf.transition(mm, mf.FAILED, now_ts())
            scheduler.dequeue(reg.root, run.run_id)
            return False
        with run.update() as mm:
            if mm["status"] != mf.QUEUED:
                return True  # it started or ended meanwhile
            restarts = int(mm.get("restarts") or 0)
            if restarts >= MAX_RESTARTS:
                # its supervisors keep dying before it starts: restarting again would loop forever
                mm["error"] = {
                    "code": "restart_limit",
                    "message": f"the queued run's supervisor died {restarts + 1} times before starting it; "
                    "not restarted again (see runs/<id>/supervisor.log); replay it",
                }
                mf.transition(mm, mf.FAILED, now_ts())
            else:
                mm["restarts"] = restarts + 1
        if mm["status"] == mf.FAILED:
            scheduler.dequeue(reg.root, run.run_id)
            return False
        handover.spawn(reg.root, run.run_id, {"env": env, "secret_env": {}, "umask": umask}, lock.fd, by="reap")
        return True
    finally:
        lock.release()


def _declared_secrets(m: dict) -> bool:
    """True if the run had secret values a salvage cannot rescan its artifacts for."""
    return bool((m.get("request") or {}).get("secret_env")) or bool((m.get("redaction") or {}).get("plugin_values"))


def _kill(ids: list[int], *, group: bool) -> None:
    import signal

    for i in ids:
        try:
            (os.killpg if group else os.kill)(i, signal.SIGKILL)
        except OSError:
            pass
