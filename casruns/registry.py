"""``casruns.Registry``: the facade the CLI and embedders use.

Everything a user can do to a registry is a method here; each delegates to the module that
owns the concept (spec: ARCHITECTURE.md). The CLI only parses arguments, calls one of these
and renders the result. Nothing here imports click, and the query path (``get``, ``list``)
imports neither zstandard nor blake3 nor plugins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from . import actions, evidence, intake, query, recovery, replay
from .evidence import LOG_STREAMS
from .intake import parse_labels
from .root import RegistryRoot, default_root
from .runs import RunDir, iter_run_ids, run_stray

TYPE_CHECKING = False  # typing costs 3 ms on the status path; this spelling costs nothing
if TYPE_CHECKING:
    from .tree import Tree

__all__ = ["Registry", "RegistryRoot", "default_root", "parse_labels", "LOG_STREAMS"]


class Registry(RegistryRoot):
    """A registry directory (an opened :class:`RegistryRoot`) and everything one can do to it."""

    def submit(
        self,
        argv: list[str],
        *,
        provider: str = "shell",
        timeout: str | float | None = None,
        labels: Mapping[str, str] | None = None,
        env: Iterable[str] = (),
        secret_env: Iterable[str] = (),
        cwd: str | None = None,
        recipe: str | None = None,
        run_id: str | None = None,
        retain_for: str | float | None = None,
        environ: Mapping[str, str] | None = None,
        spawn: bool = True,
        _chain: Mapping | None = None,
    ) -> dict:
        """Record a run as queued, start its supervisor, return its record at once.

        ``env`` items are ``NAME=VALUE`` or ``NAME`` (taken from ``environ``); ``secret_env``
        names are read from ``environ`` and their values only ever reach the supervisor's
        memory. With a caller-chosen ``run_id``, submitting the same request again returns
        the existing run; a different request under that id raises RunIdConflict.
        """
        return intake.submit(self, argv, provider=provider, timeout=timeout, labels=labels, env=env, secret_env=secret_env, cwd=cwd, recipe=recipe, run_id=run_id, retain_for=retain_for, environ=environ, spawn=spawn, _chain=_chain)

    def manifest(self, run_id: str) -> dict:
        return query.manifest(self, run_id)

    def get(self, run_id: str, *, reap: bool = True) -> dict:
        """The run's record (``casruns/run/v1``); reaps it first if its supervisor is lost."""
        return query.get(self, run_id, reap=reap)

    def list(
        self,
        *,
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
        """Records newest first, filtered by status (any of), labels (all of), creation time;
        ``before`` and ``where`` page and filter further (see :func:`casruns.query.list_runs`)."""
        return query.list_runs(
            self, statuses=statuses, labels=labels, since=since, limit=limit, promoted=promoted, reap=reap, errors=errors,
            before=before, where=where,
        )

    def wait(self, run_ids: list[str], *, timeout: float | None = None, poll: float | None = None) -> tuple[list[dict], bool]:
        """Block until every run is terminal. Returns (records, all_terminal)."""
        return query.wait(self, run_ids, timeout=timeout, poll=poll)

    def events(self, **kw) -> Iterator[dict]:
        """Events (``casruns/event/v1``) in journal order; see :func:`casruns.stream.events` for
        the arguments (``since``, ``from_start``, ``from_now``, ``follow``, ``run_ids``,
        ``labels``, ``types``, ``until_terminal``, ``timeout``, ``state``)."""
        from .stream import events

        return events(self, **kw)

    def events_cursor(self) -> str:
        """The event journal's end now: following from it reports every later change."""
        from .journal import format_cursor
        from .runs import journal_of

        return format_cursor(journal_of(self.runs_dir).end())

    def cancel(self, run_id: str, *, reason: str | None = None) -> tuple[dict, str]:
        """Cancel a run. Returns (record, outcome) with outcome one of
        ``cancelled`` (was queued: done now), ``requested`` (active: the supervisor stops it),
        ``already_requested`` or ``already_terminal`` (nothing changed).
        """
        return actions.cancel(self, run_id, reason=reason)

    def promote(self, run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
        """Mark a terminal run as accepted evidence. Returns (record, outcome) with outcome
        ``promoted`` or ``already_promoted``. Plugins may veto (PluginError, nothing changes)
        or add metadata to the promotion entry.
        """
        return actions.promote(self, run_id, reason=reason, by=by)

    def unpromote(self, run_id: str, *, reason: str, by: str | None = None) -> tuple[dict, str]:
        """Reverse a promotion; the history of both stays in the manifest."""
        return actions.unpromote(self, run_id, reason=reason, by=by)

    def retain(self, run_id: str, *, for_: str | float | None = None, until: str | None = None) -> dict:
        """Override a run's retention: keep it ``for_`` long after it finished, or ``until`` a time."""
        return actions.retain(self, run_id, for_=for_, until=until)

    def replay(self, run_id: str, *, run_id_new: str | None = None, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
        """Submit a new run from a run's recipe (secrets and env values read again from
        ``environ``), linked to it by ``replay_of``.
        """
        return replay.replay(self, run_id, run_id_new=run_id_new, environ=environ, spawn=spawn)

    def resume(self, run_id: str, *, environ: Mapping[str, str] | None = None, spawn: bool = True) -> dict:
        """Start attempt n+1 of a failed, timed-out or cancelled run, seeded with its artifacts.

        The command sees ``CASRUNS_RESUMED_FROM`` (the earlier run id) and ``CASRUNS_ATTEMPT``.
        A plugin may refuse (``{"refuse": why}``) or prepare it (``{"env": {...}}``).
        """
        return replay.resume(self, run_id, environ=environ, spawn=spawn)

    def chain(self, run_id: str) -> list[dict]:
        """Every attempt of the run's chain (linked by ``resumed_from``), first attempt first."""
        return replay.chain(self, run_id)

    def follow(self, run_id: str, streams: Iterable[str] = ("stdout", "stderr"), *, poll: float | None = None) -> Iterator[tuple[str, bytes]]:
        """``(stream, bytes)`` of a run's output as it is written, until the run is terminal."""
        from .follow import follow_streams

        return follow_streams(self, run_id, streams) if poll is None else follow_streams(self, run_id, streams, poll=poll)

    def scan(self, run_ids: list[str] | None = None, *, progress=None) -> dict:
        """Look for secrets that were not masked in runs' logs, artifacts and records."""
        from .scan import scan

        return scan(self, run_ids, progress=progress)

    def reap_lost(self, run: RunDir) -> dict:
        """End an active run whose supervisor is gone: kill leftovers, salvage, mark failed."""
        return recovery.reap_lost(self, run)

    def reap(self) -> dict:
        """Find every run whose supervisor is gone: end active ones, restart queued ones."""
        return recovery.reap(self)

    def log_chunks(self, run_id: str, stream: str = "stdout", *, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The bytes of one log stream from byte ``offset`` on; with ``follow``, keeps yielding
        until the run ends."""
        return evidence.log_chunks(self, run_id, stream, follow=follow, offset=offset)

    def tree(self, run_id: str) -> "Tree":
        return evidence.tree(self, run_id)

    def cat(self, run_id: str, path: str) -> Iterator[bytes]:
        return evidence.cat(self, run_id, path)

    def export(self, run_id: str, dest: str, progress=None) -> dict:
        """Materialize artifacts under ``DEST/artifacts``, logs under ``DEST/logs`` and the record
        as ``DEST/run.json``.

        DEST may exist (a real directory, never a symlink or a file), but none of the three
        entries may: they are built in a fresh directory inside DEST and renamed into place, so
        nothing already standing there (a symlink planted as ``DEST/logs``, say) is followed.
        """
        return evidence.export(self, run_id, dest, progress)

    def gc(self, *, dry_run: bool = False, wait: bool = False, progress=None) -> dict:
        from .gc import collect_garbage

        return collect_garbage(self, dry_run=dry_run, wait=wait, progress=progress)

    def verify(
        self, run_ids: list[str] | None = None, *, read_data: bool = False, quarantine: bool = False, against: str | None = None, progress=None
    ) -> dict:
        from .verify import verify

        report = verify(self, run_ids, read_data=read_data, quarantine=quarantine, progress=progress)
        if against:
            from .archive import compare

            ids = run_ids or [rid for rid in iter_run_ids(self.runs_dir) if run_stray(self.runs_dir, rid) is None]
            diffs = compare(self, against, sorted(ids), read_data=read_data)
            report["against"] = against
            report["problems"].extend(diffs)
            report["ok"] = report["ok"] and not diffs  # strays found above stay findings
        return report

    def archive_push(
        self, dest: str, run_ids: list[str] | None = None, *, promoted: bool = False, progress=None,
        jobs: int | None = None, verify_existing: bool = False,
    ) -> dict:
        from .archive import JOBS, push

        return push(
            self, dest, run_ids, promoted=promoted, progress=progress, jobs=JOBS if jobs is None else jobs,
            verify_existing=verify_existing,
        )

    def archive_pull(self, src: str, run_ids: list[str] | None = None, *, progress=None, jobs: int | None = None) -> dict:
        from .archive import JOBS, pull

        return pull(self, src, run_ids, progress=progress, jobs=JOBS if jobs is None else jobs)

    def archive_watch(self, dest: str, *, promoted: bool = False, timeout: float | None = None, on_push=None, **kw) -> dict:
        """Push runs to ``dest`` as they finish (or get promoted), following the event journal;
        resumable (spec/cli.md, ``archive push --watch``)."""
        from .archivewatch import watch

        return watch(self, dest, promoted=promoted, timeout=timeout, on_push=on_push, **kw)

    def archive_record(self, src: str, run_id: str) -> dict:
        """One archived run's record (``casruns/run/v1``), read straight from the archive."""
        from .archive import archived_run
        from .record import build

        return build(archived_run(self, src, run_id)[1], self.config)

    def archive_tree(self, src: str, run_id: str):
        """One archived run's artifact tree, read from the archive and verified."""
        from .archive import archived_run, archived_tree

        remote, m = archived_run(self, src, run_id)
        return archived_tree(remote, m), m

    def archive_log_chunks(self, src: str, run_id: str, stream: str = "stdout") -> Iterator[bytes]:
        """One archived run's log, streamed from the archive and verified at its end."""
        from .archive import archived_chunks, archived_run

        if stream not in LOG_STREAMS:
            from .errors import InvalidInput

            raise InvalidInput(f"unknown stream {stream!r}; one of: {', '.join(LOG_STREAMS)}")
        remote, m = archived_run(self, src, run_id)
        ref = (m.get("logs") or {}).get(stream)
        return archived_chunks(remote, ref["blake3"]) if ref else iter(())

    def archive_cat(self, src: str, run_id: str, path: str) -> Iterator[bytes]:
        """One artifact of an archived run, streamed from the archive and verified at its end."""
        from .archive import archived_chunks, archived_run, archived_tree
        from .errors import ArtifactNotFound

        remote, m = archived_run(self, src, run_id)
        entry = archived_tree(remote, m).get(path)
        if entry is None or entry.type != "file":
            raise ArtifactNotFound(f"archived run {run_id} has no artifact file {path!r}", run_id=run_id, path=path)
        return archived_chunks(remote, entry.blake3)

    def archive_gc(self, dest: str, *, dry_run: bool = False, wait: bool = False, progress=None) -> dict:
        """Expire archived runs by the archive's own retention and sweep blobs no run references,
        safely while other machines push (spec/archive-gc.md)."""
        from .archivegc import gc

        return gc(self, dest, dry_run=dry_run, wait=wait, progress=progress)

    def archive_config(self, dest: str, sets: list[str] | None = None, unsets: list[str] | None = None) -> dict:
        """The archive's settings (``casruns/archive-config/v1``), edited first if asked."""
        from . import archiveconfig
        from .archive import _check_marker, open_remote

        remote = open_remote(dest, self)
        _check_marker(remote)
        if sets or unsets:
            return archiveconfig.edit(remote, list(sets or ()), list(unsets or ())).to_json(remote.url)
        return archiveconfig.read(remote)[0].to_json(remote.url)

    def archive_list(self, src: str, **filters) -> dict:
        """An archive's runs, newest first; ``filters``: ``statuses``, ``labels``, ``promoted``,
        ``since``, ``limit`` (as :meth:`list`)."""
        from .archive import list_archive

        return list_archive(self, src, **filters)
