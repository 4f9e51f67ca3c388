"""Named fault-injection points: the one mechanism crash tests use to stop code at an exact step.

Code that has a crash window worth testing calls ``faults.point("name")`` there. In production the
call costs one dictionary lookup (the variable is read once per process). Tests set
``CASRUNS_TEST_FAULT`` to a comma-separated list of ``name`` or ``name=action`` items:

* ``kill`` (the default): SIGKILL this process at that point, the way a crash or the OOM killer would;
* ``enospc``: raise ``OSError(ENOSPC)`` there, the way a full disk would;
* ``stop``: SIGSTOP this process (a test resumes or kills it);
* ``error``: raise ``RuntimeError`` there, the way an unexpected bug would.

An action may end in ``@N``: it fires the N-th time the point is reached in this process
(``archive_push_blob=kill@7``: killed while sending the seventh blob), not before.

Every point is listed in :data:`POINTS` with the crash window it stands for, and a test checks that
each listed point is used in the code and each used point is listed (spec/format.md, "Crash windows").
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CASRUNS_TEST_FAULT"

# name -> the crash window it stops the code in.
POINTS: dict[str, str] = {
    "submit_after_spawn": "the submitter started the supervisor and dies before handing it the payload",
    "submit_mid_payload": "the submitter dies after writing half of the payload",
    "reap_after_spawn": "reap restarted a queued run's supervisor and dies before handing it the payload",
    "reap_mid_payload": "reap dies after writing half of a restarted run's payload",
    "supervisor_start": "the supervisor took its lock and is about to start the run (before the slot wait)",
    "supervisor_before_collect": "the supervisor dies after the command ended, before collection",
    "supervisor_collect": "the supervisor's collection of logs and artifacts into the store (enospc: a full disk)",
    "gc_after_trash": "gc dies after finishing a killed gc's trash",
    "gc_after_sightings": "gc dies after recording first sightings of terminal runs, before removing any",
    "gc_after_run_rename": "gc dies after renaming a run to its trash, before deleting it",
    "gc_after_runs_removed": "gc dies after removing runs, before the mark",
    "gc_after_mark": "gc dies after the mark, before the sweep",
    "gc_after_first_delete": "gc dies after deleting its first blob",
    "gc_after_pack_rewrite": "gc dies after writing a rewritten pack, before deleting the old one",
    "gc_after_pack_merge": "gc dies after writing a merged pack, before deleting its sources",
    "archive_push_blob": "archive push sent a blob, before its run's manifest (kill@N: after the N-th blob)",
    "archive_push_after_lease": "archive push wrote its lease and has not read gc's marks yet",
    "archive_push_before_manifest": "archive push has every blob of a run in the archive (touched where a mark lists it) and has not written its manifest",
    "archive_gc_after_lock": "archive gc holds the gc lock and has removed nothing yet",
    "archive_gc_mid_expire": "archive gc wrote its deletion record's intent and removed some expired runs' manifests (kill@N: after the N-th)",
    "archive_gc_after_mark": "archive gc wrote its mark (the candidates) and has not listed the push leases yet",
    "archive_gc_after_sweep_start": "archive gc wrote its sweep object and its record's intent and has deleted no blob yet",
    "archive_gc_mid_sweep": "archive gc deleted one batch of candidate blobs (kill@N: after the N-th batch)",
    "archive_gc_after_sweep": "archive gc deleted every blob it swept and has not completed its record or removed its mark",
    "archive_push_mid_object": "a push to a directory archive dies (or its disk fills) with an object partly written to its temp",
    "event_after_pending": "a writer recorded its pending change and dies before committing the manifest",
    "event_after_commit": "a writer committed the manifest and dies before appending its event to the journal",
    "event_mid_append": "an appender dies with half of its event line written (a torn tail)",
    "event_after_append": "a writer appended its event and dies before removing its pending record",
    "archive_pull_after_first_run": "a pull that committed a run dies (or the registry's disk fills) while storing a later run's blobs",
}

_active: dict[str, str] | None = None


def _load() -> dict[str, str]:
    global _active
    if _active is None:
        spec = os.environ.get(ENV, "")
        _active = {}
        for item in spec.split(","):
            name, _, action = item.strip().partition("=")
            if name:
                _active[name] = action or "kill"
    return _active


_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Stop here if a test asked for a fault at ``name``; otherwise do nothing."""
    action = (_active if _active is not None else _load()).get(name)
    if action is None:
        return
    action, _, nth = action.partition("@")
    if nth:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] < int(nth):
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "error":
        raise RuntimeError(f"fault injected at {name}")


def armed(name: str) -> bool:
    """True if a test asked for a fault at ``name`` (for steps that must be split to be stopped
    halfway, such as a torn append)."""
    return name in (_active if _active is not None else _load())


def reset() -> None:
    """Forget the parsed variable (in-process tests that change it)."""
    global _active
    _active = None
