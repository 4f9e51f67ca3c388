"""``casruns archive push|pull|list``: evidence to and from other machines."""

from __future__ import annotations

import click

from . import render
from .app import JSON_OPT
from .progress import Progress


def register(cli: click.Group) -> None:
    @cli.group()
    def archive():
        """Copy finished runs to an archive (a directory, s3://bucket/prefix, sftp://host/path) and back."""

    @archive.command()
    @click.argument("dest")
    @click.argument("run_ids", nargs=-1)
    @click.option("--promoted", is_flag=True, help="Push every promoted run.")
    @click.option("--jobs", type=int, default=None, help="Concurrent requests to the archive (default 8).")
    @click.option(
        "--verify-existing", is_flag=True,
        help="Re-read (decode and re-hash) each blob the archive already holds; replace a bad copy.",
    )
    @JSON_OPT
    @click.pass_obj
    def push(obj, dest, run_ids, promoted, jobs, verify_existing, as_json):
        """Copy runs to DEST: blobs first, the manifest last; blobs already there (same size) are skipped."""
        progress = Progress("archive push", enabled=None if not as_json else False)
        report = obj.registry.archive_push(
            dest, list(run_ids) or None, promoted=promoted, progress=progress, jobs=jobs, verify_existing=verify_existing,
        )
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            click.echo(
                f"pushed {report['runs']} runs to {report['dest']}: {report['blobs_sent']} blobs sent "
                f"({report['bytes_sent']} bytes), {report['blobs_skipped']} already there"
                + (f" ({report['blobs_verified']} re-read)" if verify_existing else "")
                + (f", {report['blobs_replaced']} bad copies replaced" if report["blobs_replaced"] else "")
                + f"; {report['bytes_logical']} bytes referenced"
            )

    @archive.command()
    @click.argument("src")
    @click.argument("run_ids", nargs=-1)
    @click.option("--jobs", type=int, default=None, help="Concurrent requests to the archive (default 8).")
    @JSON_OPT
    @click.pass_obj
    def pull(obj, src, run_ids, jobs, as_json):
        """Import runs from SRC; every blob is verified against its address first."""
        progress = Progress("archive pull", enabled=None if not as_json else False)
        report = obj.registry.archive_pull(src, list(run_ids) or None, progress=progress, jobs=jobs)
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            click.echo(
                f"pulled {report['runs']} runs from {report['src']} ({report['runs_present']} already here): "
                f"{report['blobs_received']} blobs received ({report['bytes_received']} bytes), "
                f"{report['blobs_present']} already here"
            )
        for e in report.get("errors", []):
            click.echo(f"casruns: error: {e['run_id']}: {e['message']}", err=True)
        return 6 if report.get("errors") else 0

    @archive.command(name="list")
    @click.argument("src")
    @JSON_OPT
    @click.pass_obj
    def list_(obj, src, as_json):
        """Runs held by an archive, with their status and promotion."""
        report = obj.registry.archive_list(src)
        if as_json:
            render.emit_json(report)
        else:
            for r in report["runs"]:
                click.echo(f"{r['run_id']}  {r['status']}{'  promoted' if r['promoted'] else ''}")
            click.echo(f"{len(report['runs'])} runs in {report['src']}")
            for e in report.get("errors", []):
                click.echo(f"casruns: error: {e['run_id']}: {e['message']}", err=True)
        return 6 if report.get("errors") else 0
