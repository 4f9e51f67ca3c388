"""``casruns archive push|pull|list``: evidence to and from other machines."""

from __future__ import annotations

import sys

import click

from . import options, render
from .options import json_option
from .progress import progress

_JOBS_HELP = "Concurrent requests to the archive (default 8)."


def register(cli: click.Group) -> None:
    @cli.group()
    def archive():
        """Copy finished runs to an archive (a directory, s3://bucket/prefix, sftp://host/path) and back."""

    for add in (_add_push, _add_pull, _add_list, _add_reads, _add_gc):
        add(archive)


def _error_lines(report: dict):
    """The runs an archive command could not handle, one stderr line each."""
    return (f"casruns: error: {e['run_id']}: {e['message']}" for e in report.get("errors", []))


def _add_push(archive: click.Group) -> None:
    @archive.command()
    @click.argument("dest")
    @click.argument("run_ids", nargs=-1)
    @click.option("--promoted", is_flag=True, help="Push every promoted run.")
    @click.option("--jobs", type=int, default=None, help=_JOBS_HELP)
    @click.option(
        "--verify-existing", is_flag=True,
        help="Re-read (decode and re-hash) each blob the archive already holds; replace a bad copy.",
    )
    @click.option("--watch", is_flag=True, help="Keep pushing runs as they finish (with --promoted: as they get promoted), resumably.")
    @click.option("--timeout", help="With --watch: stop after this long.")
    @json_option
    @click.pass_obj
    def push(obj, dest, run_ids, promoted, jobs, verify_existing, watch, timeout, as_json):
        """Copy runs to DEST: blobs first, the manifest last; blobs already there (same size) are skipped."""
        if watch:
            if run_ids or verify_existing:
                from ..errors import InvalidInput

                raise InvalidInput("--watch pushes runs as they finish: give no RUN_IDs and no --verify-existing")

            def pushed(report):
                render.emit(as_json, report, lambda r: f"{r['run_id'] or 'catch-up'}: " + _push_line(r, False))
                sys.stdout.flush()

            try:
                summary = obj.registry.archive_watch(dest, promoted=promoted, timeout=options.parse_duration(timeout),
                                                     on_push=pushed, **({"jobs": jobs} if jobs else {}))
            except KeyboardInterrupt:
                return 0
            if as_json:
                render.emit(True, summary)
            return 0
        with progress("archive push", as_json) as p:
            report = obj.registry.archive_push(
                dest, options.optional_run_ids(run_ids), promoted=promoted, progress=p, jobs=jobs, verify_existing=verify_existing,
            )
        render.emit(as_json, report, lambda r: _push_line(r, verify_existing))


def _push_line(r: dict, verify_existing: bool) -> str:
    return (
        f"pushed {r['runs']} runs to {r['dest']}: {r['blobs_sent']} blobs sent "
        f"({r['bytes_sent']} bytes), {r['blobs_skipped']} already there"
        + (f" ({r['blobs_verified']} re-read)" if verify_existing else "")
        + (f", {r['blobs_replaced']} bad copies replaced" if r["blobs_replaced"] else "")
        + f"; {r['bytes_logical']} bytes referenced"
    )


def _add_pull(archive: click.Group) -> None:
    @archive.command()
    @click.argument("src")
    @click.argument("run_ids", nargs=-1)
    @click.option("--jobs", type=int, default=None, help=_JOBS_HELP)
    @json_option
    @click.pass_obj
    def pull(obj, src, run_ids, jobs, as_json):
        """Import runs from SRC; every blob is verified against its address first."""
        with progress("archive pull", as_json) as p:
            report = obj.registry.archive_pull(src, options.optional_run_ids(run_ids), progress=p, jobs=jobs)
        render.emit(as_json, report, _pull_line)
        # Also under --json, unlike archive list, though spec/cli.md says --json prints nothing
        # on stderr: kept as it was (the errors are in the JSON report as well).
        render.echo(_error_lines(report), err=True)
        return 6 if report.get("errors") else 0


def _pull_line(r: dict) -> str:
    return (
        f"pulled {r['runs']} runs from {r['src']} ({r['runs_present']} already here): "
        f"{r['blobs_received']} blobs received ({r['bytes_received']} bytes), "
        f"{r['blobs_present']} already here"
    )


def _add_list(archive: click.Group) -> None:
    @archive.command(name="list")
    @click.argument("src")
    @options.list_filter_options
    @json_option
    @click.pass_obj
    def list_(obj, src, statuses, labels, since, limit, promoted, as_json):
        """Runs held by an archive, newest first, with their status, promotion and origin."""
        report = obj.registry.archive_list(src, statuses=statuses, labels=options.parse_labels(labels), promoted=promoted,
                                           since=since, limit=limit)
        render.emit(as_json, report, _list_lines)
        if not as_json:
            render.echo(_error_lines(report), err=True)
        return 6 if report.get("errors") else 0


def _list_lines(report: dict):
    for r in report["runs"]:
        where = (r.get("origin") or {}).get("host") or "?"
        yield f"{r['run_id']}  {r['status']}{'  promoted' if r['promoted'] else ''}  from {where}"
    yield f"{len(report['runs'])} runs in {report['src']}"


def _add_reads(archive: click.Group) -> None:
    """status, logs, artifacts and cat of one archived run, read straight from the archive."""
    from .evidence import emit_tree, write_chunks
    from .runs import _status_line

    @archive.command(name="status")
    @click.argument("src")
    @click.argument("run_id")
    @json_option
    @click.pass_obj
    def status(obj, src, run_id, as_json):
        """One archived run's record (the same JSON as status), without pulling it."""
        render.emit(as_json, obj.registry.archive_record(src, run_id), _status_line)

    @archive.command(name="artifacts")
    @click.argument("src")
    @click.argument("run_id")
    @json_option
    @click.pass_obj
    def artifacts(obj, src, run_id, as_json):
        """One archived run's artifact tree (verified), without pulling it."""
        tree, m = obj.registry.archive_tree(src, run_id)
        emit_tree(as_json, run_id, tree, m)

    @archive.command(name="logs")
    @click.argument("src")
    @click.argument("run_id")
    @click.option("--stream", default="stdout", show_default=True, help="stdout, stderr or transcript.")
    @json_option
    @click.pass_obj
    def logs(obj, src, run_id, stream, as_json):
        """One archived run's log (verified; exit 7 if corrupt). --json makes errors JSON."""
        write_chunks(obj.registry.archive_log_chunks(src, run_id, stream))

    @archive.command(name="cat")
    @click.argument("src")
    @click.argument("run_id")
    @click.argument("path")
    @json_option
    @click.pass_obj
    def cat(obj, src, run_id, path, as_json):
        """One artifact of an archived run (verified; exit 7 if corrupt). --json makes errors JSON."""
        write_chunks(obj.registry.archive_cat(src, run_id, path))


def _add_gc(archive: click.Group) -> None:
    @archive.command(name="gc")
    @click.argument("dest")
    @click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
    @click.option("--wait", is_flag=True, help="Wait (grace, pushes in progress) and sweep in this run instead of leaving it to the next gc.")
    @json_option
    @click.pass_obj
    def gc(obj, dest, dry_run, wait, as_json):
        """Remove expired runs from an archive and the blobs no remaining run references, safely while others push."""
        with progress("archive gc", as_json) as p:
            report = obj.registry.archive_gc(dest, dry_run=dry_run, wait=wait, progress=p)
        render.emit(as_json, report, _gc_lines)
        if not as_json:
            render.echo((f"casruns: error: {e['run_id']}: {e['message']}" for e in report["runs_unreadable"]), err=True)
        return 14 if report["runs_unreadable"] else 0

    @archive.command(name="config")
    @click.argument("dest")
    @click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                  help="retention.<status>=D, retention.promoted=D, retention.keep_last.<label>=N, gc.grace=D, gc.lease=D.")
    @click.option("--unset", "unsets", multiple=True, metavar="KEY", help="Remove a setting.")
    @json_option
    @click.pass_obj
    def config(obj, dest, sets, unsets, as_json):
        """Show or change an archive's own settings (its config.toml): retention, keep-last, gc grace."""
        report = obj.registry.archive_config(dest, list(sets), list(unsets))
        render.emit(as_json, report, _config_lines)
        return 0


def _gc_lines(r: dict):
    verb = "would remove" if r["dry_run"] else "removed"
    yield f"{verb} {len(r['runs_removed'])} expired runs and {r['blobs_removed']} blobs ({r['bytes_removed']} bytes) from {r['dest']}"
    for run in r["runs_removed"]:
        yield f"  {run['run_id']}  {run['status']}  ({run['rule']})"
    mark = r.get("mark") or {}
    if mark.get("state") == "waiting":
        why = f"until {mark['ready_at']}" if mark.get("reason") == "grace" else f"for {len(mark.get('leases') or [])} pushes in progress"
        yield f"{mark['candidates']} unreferenced blobs are marked; they are swept by a gc after the grace ({why})"
    elif mark.get("state") == "made":
        yield f"marked {mark['candidates']} unreferenced blobs"
    if r["runs_changed"]:
        yield f"{r['runs_changed']} runs were pushed again while gc ran and are kept"
    if r.get("record"):
        yield f"deletion record: {r['record']}"


def _config_lines(c: dict):
    ret = c["retention"]
    for status, secs in ret.items():
        yield f"retention.{status} = {'kept until unpromoted' if secs is None and status == 'promoted' else f'{secs:.0f}s'}"
    for label, n in c["keep_last"].items():
        yield f"retention.keep_last.{label} = {n}"
    yield f"gc.grace = {c['grace']:.0f}s"
    yield f"gc.lease = {c['lease']:.0f}s"
