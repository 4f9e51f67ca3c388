"""Commands about what finished runs leave behind: artifacts, cat, export, promote, unpromote,
retain, scan."""

from __future__ import annotations

import sys

import click

from .. import errors as E
from . import options, render
from .options import json_option
from .progress import progress


def register(cli: click.Group) -> None:
    for add in (_add_artifacts, _add_cat, _add_export, _add_promotion, _add_retain, _add_scan):
        add(cli)


def _add_artifacts(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @json_option
    @click.pass_obj
    def artifacts(obj, run_id, as_json):
        """List a run's artifact tree."""
        emit_tree(as_json, run_id, obj.registry.tree(run_id), obj.registry.manifest(run_id))


def emit_tree(as_json: bool, run_id: str, tree, m: dict) -> None:
    """``casruns/artifacts/v1`` for a run's tree (local or archived: the same JSON)."""
    doc = {
        "schema": "casruns/artifacts/v1",
        "run_id": run_id,
        "tree": (m.get("artifacts") or {}).get("tree"),
        "files": tree.files,
        "bytes": tree.total_size,
        "entries": [e.to_json() for e in tree.entries],
        "skipped": tree.skipped,
    }
    render.emit(as_json, doc, lambda doc: _tree_lines(tree))


def write_chunks(chunks) -> None:
    """Raw bytes to stdout (a verified stream: an IntegrityError at its end still fails the command)."""
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
    out.flush()


def _tree_lines(tree):
    for e in tree.entries:
        if e.type == "file":
            yield f"{e.mode:04o}  {e.size:>12}  {e.blake3[:16]}  {e.path}"
        else:
            yield f"link  {'':>12}  {'':16}  {e.path} -> {e.target}"
    yield f"{tree.files} files, {tree.total_size} bytes"


def _add_cat(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.argument("path")
    @json_option
    @click.pass_obj
    def cat(obj, run_id, path, as_json):
        """Write one artifact to stdout (verified; exit 7 if corrupt). --json makes errors JSON."""
        write_chunks(obj.registry.cat(run_id, path))


def _add_export(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.argument("dest", type=click.Path(file_okay=False))
    @json_option
    @click.pass_obj
    def export(obj, run_id, dest, as_json):
        """Materialize a finished run's artifacts and logs under DEST."""
        with progress("export", as_json) as p:
            report = obj.registry.export(run_id, dest, progress=p)
        render.emit(as_json, report, lambda r: f"exported {r['files']} files ({r['bytes']} bytes) to {r['dest']}")
        if not as_json:
            render.echo((f"refused {r['path']}: {r['reason']}" for r in report["refused"]), err=True)


def _add_promotion(cli: click.Group) -> None:
    """``promote`` and ``unpromote``: one shape, two registry methods."""
    for name, promote, help in (
        ("promote", True, "Mark a finished run as accepted evidence (kept by retention and gc; plugins may veto)."),
        ("unpromote", False, "Reverse a promotion; the history of both is kept."),
    ):
        _promotion_command(cli, name, promote, help)


def _promotion_command(cli: click.Group, name: str, promote: bool, help: str) -> None:
    @cli.command(name=name, help=help)
    @click.argument("run_id")
    @click.option("--reason", required=True, help="Why (recorded in the run's history).")
    @click.option("--by", help="Who (a person or a tool).")
    @json_option
    @click.pass_obj
    def cmd(obj, run_id, reason, by, as_json):
        reg = obj.registry
        r, outcome = (reg.promote if promote else reg.unpromote)(run_id, reason=reason, by=by)
        render.emit(
            as_json,
            {"schema": "casruns/promotion/v1", "run_id": run_id, "outcome": outcome, "run": r},
            lambda doc: f"{run_id}: {outcome.replace('_', ' ')}",
        )


def _add_retain(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.option("--for", "for_", metavar="DURATION", help="Keep the run this long after it finished.")
    @click.option("--until", metavar="TIME", help="Keep the run until this time (RFC 3339).")
    @json_option
    @click.pass_obj
    def retain(obj, run_id, for_, until, as_json):
        """Override a run's retention."""
        r = obj.registry.retain(run_id, for_=for_, until=until)
        render.emit(as_json, r, lambda r: _retention_line(run_id, r))


def _retention_line(run_id: str, r: dict) -> str:
    ret = r["retention"]
    return f"{run_id}: kept until {ret['retain_until'] or 'finished + ' + str(ret['retain_for']) + 's'} ({ret['rule']})"


def _add_scan(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_ids", nargs=-1)
    @json_option
    @click.pass_obj
    def scan(obj, run_ids, as_json):
        """Re-check stored runs against today's secret detectors (exit 14 if anything is found)."""

        with progress("scanning runs", as_json) as p:
            report = obj.registry.scan(options.optional_run_ids(run_ids), progress=p)
        render.emit(as_json, report, _scan_lines)
        return E.EXIT_FINDINGS if report["findings"] else 0


def _scan_lines(report: dict):
    for f in report["findings"]:
        yield f"{f['run_id']}  {f['where']}  {f['detector']} x{f['count']}"
    yield f"scanned {report['runs_scanned']} runs, {len(report['findings'])} findings"
