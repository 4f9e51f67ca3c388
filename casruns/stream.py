"""Reading the event journal: ``casruns events``, from a cursor, filtered, optionally following.

A follower sleeps in the kernel (``notify``: inotify on Linux, a polling fallback elsewhere)
until the journal's segments change, then reads the new complete lines. While idle it looks
for pending changes whose writer died (``Journal.resolve``) at most once a second, so a crash
between a manifest commit and its journal append is reported (``recovered``) even when no
other writer comes along. ``until_terminal`` ends the stream once every named run is
terminal (or removed), with ``wait``'s exit-code mapping left to the caller.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping

from . import events as ev
from . import manifest as mf
from . import query
from .errors import CasrunsError, InvalidInput, RunNotFound
from .journal import format_cursor
from .runs import committed, journal_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .root import RegistryRoot

REPAIR_EVERY = 1.0  # seconds: how often an idle follower looks for writers that died mid-commit


def events(
    reg: "RegistryRoot",
    *,
    since: str | None = None,
    from_start: bool = False,
    from_now: bool = False,
    follow: bool = False,
    run_ids: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    types: Iterable[str] = (),
    until_terminal: bool = False,
    timeout: float | None = None,
    state: dict | None = None,
) -> Iterator[dict]:
    """Yield events (``casruns/event/v1``, each with its ``cursor``) in journal order.

    Start: after ``since``; at the journal's start (``from_start``, the default without
    ``follow``); or at its end (``from_now``, the default with ``follow``). ``state``, when
    given, is filled with ``terminal`` (run id → last known status) and ``timed_out``.
    """
    if sum(bool(x) for x in (since, from_start, from_now)) > 1:
        raise InvalidInput("give at most one of --since, --from-start, --from-now")
    run_ids = [r for r in run_ids]
    types = set(types)
    unknown = types - set(ev.TYPES) - set(mf.STATUSES)
    if unknown:
        raise InvalidInput(f"unknown event type {sorted(unknown)[0]!r}; one of: {', '.join(ev.TYPES)} (or a status name)")
    if until_terminal and not run_ids:
        raise InvalidInput("--until-terminal needs at least one --run RUN_ID")
    if not reg.check_format():
        raise RunNotFound(f"registry {reg.root} does not exist")
    journal = journal_of(reg.runs_dir)
    if since:
        position = journal.position_of(since)
    elif from_now or (follow and not from_start):
        position = journal.end()
    else:
        position = journal.segments()[0] if journal.segments() else 0
    state = state if state is not None else {}
    statuses: dict[str, str] = state.setdefault("statuses", {})
    incarnations: dict[str, str] = {}
    if until_terminal:
        for rid in run_ids:  # after fixing the start: a change from now on is in the stream
            rec = query.get(reg, rid)
            statuses[rid] = rec["status"]
            incarnations[rid] = rec.get("incarnation") or ""
    wanted = set(run_ids)

    def done() -> bool:
        return until_terminal and all(statuses.get(r) in mf.TERMINAL for r in run_ids)

    if done():
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    watch = None
    runs_dir = reg.runs_dir
    if journal.pending_for():  # a writer that died mid-commit: its change is reported first
        journal.resolve(lambda doc: committed(runs_dir, doc))
    last_repair = time.monotonic()
    try:
        while True:
            for pos, stored in journal.read(position):
                position = pos
                event = {"schema": stored.pop("schema", ev.SCHEMA), "cursor": format_cursor(pos), **stored}
                rid = event.get("run_id")
                if until_terminal and rid in wanted and event.get("incarnation", "") == incarnations.get(rid):
                    # (an earlier incarnation of a reused run id says nothing about this one)
                    # a removed run keeps the terminal status it was removed in
                    statuses[rid] = event.get("old_status") if event.get("type") == "removed" else event.get("new_status")
                if ev.matches(event, run_ids=wanted, labels=labels, types=types):
                    yield event
            # after what is readable now: the rest of the update that made a run terminal (a queued
            # run's cancel_requested is followed by its status event, a salvage's status by salvaged)
            if done():
                return
            if not (follow or until_terminal):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                state["timed_out"] = True
                return
            if now - last_repair >= REPAIR_EVERY:
                last_repair = now
                if journal.pending_for() and journal.resolve(lambda doc: committed(runs_dir, doc)):
                    continue  # a recovered event was appended: read it now
                if until_terminal:
                    _reap(reg, run_ids, statuses)
            if watch is None:
                watch = _watch(journal)
                continue  # look once more: an append may have landed before the watch existed
            wait = REPAIR_EVERY
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            watch.wait(wait)
    finally:
        if watch is not None:
            watch.close()


def _watch(journal):
    from . import notify

    try:
        journal.ensure()  # so there is a directory to watch (a read-only reader cannot: it polls)
    except (CasrunsError, OSError):
        pass
    return notify.watch([journal.segments_dir, journal.pending_dir])


def _reap(reg: "RegistryRoot", run_ids: list[str], statuses: dict[str, str]) -> None:
    """A run whose supervisor died makes no event by itself: end it (as ``wait`` does), which
    commits (and so reports) its terminal status; restart a queued one (as ``wait`` does)."""
    from .recovery import restart_queued

    for rid in run_ids:
        if statuses.get(rid) in mf.ACTIVE:
            try:
                query.get(reg, rid)
            except RunNotFound:
                pass  # removed: its `removed` event (or its recovery) ends the wait
        elif statuses.get(rid) == mf.QUEUED:
            run = reg.run_dir(rid)
            try:
                if run.is_supervised():
                    continue
                time.sleep(0.05)  # the submitter hands its lock over; look twice
                if not run.is_supervised() and run.read_fresh()["status"] == mf.QUEUED:
                    restart_queued(reg, run, run.read_fresh())
            except (CasrunsError, OSError):
                pass  # removed meanwhile, or cannot be restarted now: looked at again later
