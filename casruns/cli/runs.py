"""Commands about runs: init, submit, run, status, list, wait, cancel, reap, logs,
artifacts, cat, export."""

from __future__ import annotations

import os
import sys
import time

import click

from .. import errors as E
from ..registry import parse_labels
from ..timefmt import parse_duration
from . import render
from .app import JSON_OPT


def submit_options(f):
    opts = [
        click.option("--provider", default="shell", show_default=True, help="Provider plugin that boots the sandbox."),
        click.option("--timeout", help="Wall-clock limit, e.g. 90s, 15m, 2h."),
        click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable)."),
        click.option("--secret-env", "secret_env", multiple=True, metavar="NAME", help="Pass a secret env variable; only its name is stored."),
        click.option("--env", "env", multiple=True, metavar="NAME[=VALUE]", help="Pass an env variable (value from here if omitted)."),
        click.option("--cwd", help="Working directory of the command (default: the current one)."),
        click.option("--recipe", help="Opaque recipe reference stored for replay."),
        click.option("--run-id", "run_id", help="Caller-chosen run id (idempotent submission)."),
        click.option("--retain-for", "retain_for", help="Keep the finished run at least this long, e.g. 30d."),
        click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _submit(obj, command, labels, **kw) -> dict:
    return obj.registry.submit(list(command), labels=parse_labels(labels), **kw)


def register(cli: click.Group) -> None:
    @cli.command()
    @JSON_OPT
    @click.pass_obj
    def init(obj, as_json):
        """Create the registry (it is also created on first write)."""
        created = obj.registry.init()
        if as_json:
            render.emit_json({"schema": "casruns/init/v1", "root": obj.registry.root, "created": created})
        else:
            click.echo(f"{'created' if created else 'exists'}: {obj.registry.root}")

    @cli.command()
    @JSON_OPT
    @click.pass_obj
    def migrate(obj, as_json):
        """Move an older registry to this casruns' format (older casruns then refuse it)."""
        report = obj.registry.migrate()
        if as_json:
            render.emit_json(report)
        elif report["migrated"]:
            click.echo(f"migrated {report['root']} from format {report['from_version']} to {report['to_version']}")
        else:
            click.echo(f"{report['root']} is already at format {report['to_version']}")

    @cli.command(context_settings={"ignore_unknown_options": False})
    @submit_options
    @JSON_OPT
    @click.pass_obj
    def submit(obj, command, labels, as_json, **kw):
        """Record a run and start it in the background; prints its record at once.

        Put the command after --:  casruns submit --label suite=unit -- make test
        """
        r = _submit(obj, command, labels, **kw)
        if as_json:
            render.emit_json(r)
        else:
            click.echo(r["run_id"])

    @cli.command()
    @submit_options
    @JSON_OPT
    @click.pass_obj
    def run(obj, command, labels, as_json, **kw):
        """Like submit, but stream the output here and exit with the run's outcome.

        Exit codes: 0 succeeded, 10 failed, 11 timed_out, 12 cancelled. Ctrl-C cancels the run.
        """
        reg = obj.registry
        r = _submit(obj, command, labels, **kw)
        rid = r["run_id"]
        try:
            _stream_both(reg, rid, quiet=as_json)
        except KeyboardInterrupt:
            reg.cancel(rid, reason="interrupted (Ctrl-C on casruns run)")
            _stream_both(reg, rid, quiet=True)
        final = reg.get(rid)
        if as_json:
            render.emit_json(final)
        return exit_for_status(final["status"])

    @cli.command()
    @click.argument("run_ids", nargs=-1, required=True)
    @JSON_OPT
    @click.pass_obj
    def status(obj, run_ids, as_json):
        """Show runs (JSON: one object per line). Exits 0 whatever the runs' outcome."""
        records, errs = [], []
        for rid in run_ids:
            try:
                records.append(obj.registry.get(rid))
            except E.CasrunsError as e:
                errs.append(e)
        return render.status_output(records, errs, as_json)

    @cli.command(name="list")
    @click.option("--status", "statuses", multiple=True, help="Only runs with this status (repeatable).")
    @click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only runs with this label (repeatable).")
    @click.option("--since", help="Only runs created since TIME (RFC 3339 or a duration ago, e.g. 2h).")
    @click.option("--limit", type=int, help="At most N runs.")
    @click.option("--promoted/--not-promoted", "promoted", default=None, help="Only promoted (or only unpromoted) runs.")
    @click.option("--chain", metavar="RUN_ID", help="The attempts of RUN_ID's chain (resume links), first first.")
    @JSON_OPT
    @click.pass_obj
    def list_(obj, statuses, labels, since, limit, promoted, chain, as_json):
        """List runs, newest first."""
        if chain:
            return render.list_output(obj.registry.chain(chain), as_json)
        errors: list = []
        records = obj.registry.list(
            statuses=statuses, labels=parse_labels(labels), since=since, limit=limit, promoted=promoted, errors=errors
        )
        return render.list_output(records, as_json, errors)

    @cli.command()
    @click.argument("run_ids", nargs=-1, required=True)
    @click.option("--timeout", help="Give up after this long (exit 13).")
    @JSON_OPT
    @click.pass_obj
    def wait(obj, run_ids, timeout, as_json):
        """Block until the runs are terminal; exit with the worst outcome's code."""
        t = parse_duration(timeout) if timeout else None
        records, done = obj.registry.wait(list(run_ids), timeout=t)
        for r in records:
            render.emit_json(r) if as_json else click.echo(f"{r['run_id']}  {r['status']}")
        if not done:
            return E.EXIT_WAIT_TIMEOUT
        return max((exit_for_status(r["status"]) for r in records), default=0)

    @cli.command()
    @click.argument("run_id")
    @click.option("--reason", help="Why (recorded in the run).")
    @JSON_OPT
    @click.pass_obj
    def cancel(obj, run_id, reason, as_json):
        """Cancel a run (idempotent). A terminal run is left unchanged."""
        r, outcome = obj.registry.cancel(run_id, reason=reason)
        if as_json:
            render.emit_json({"schema": "casruns/cancel/v1", "run_id": run_id, "outcome": outcome, "run": r})
        else:
            msg = {
                "cancelled": "cancelled",
                "requested": "cancel requested; the supervisor is stopping the run",
                "already_requested": "cancel was already requested",
                "already_terminal": f"run is already {r['status']}; nothing changed",
            }[outcome]
            click.echo(f"{run_id}: {msg}")

    @cli.command()
    @click.argument("run_id")
    @click.option("--run-id", "new_id", help="Id for the new run (idempotent, as in submit).")
    @JSON_OPT
    @click.pass_obj
    def replay(obj, run_id, new_id, as_json):
        """Submit a new run from RUN_ID's recipe; secrets and env values are read again from here."""
        r = obj.registry.replay(run_id, run_id_new=new_id)
        render.emit_json(r) if as_json else click.echo(r["run_id"])

    @cli.command()
    @click.argument("run_id")
    @JSON_OPT
    @click.pass_obj
    def resume(obj, run_id, as_json):
        """Start the next attempt of a failed, timed-out or cancelled run, seeded with its artifacts."""
        r = obj.registry.resume(run_id)
        render.emit_json(r) if as_json else click.echo(r["run_id"])

    def promotion_command(name: str, promote: bool):
        @cli.command(
            name=name,
            help="Mark a finished run as accepted evidence (kept by retention and gc; plugins may veto)."
            if promote
            else "Reverse a promotion; the history of both is kept.",
        )
        @click.argument("run_id")
        @click.option("--reason", required=True, help="Why (recorded in the run's history).")
        @click.option("--by", help="Who (a person or a tool).")
        @JSON_OPT
        @click.pass_obj
        def cmd(obj, run_id, reason, by, as_json):
            reg = obj.registry
            r, outcome = (reg.promote if promote else reg.unpromote)(run_id, reason=reason, by=by)
            if as_json:
                render.emit_json({"schema": "casruns/promotion/v1", "run_id": run_id, "outcome": outcome, "run": r})
            else:
                click.echo(f"{run_id}: {outcome.replace('_', ' ')}")

        return cmd

    promotion_command("promote", True)
    promotion_command("unpromote", False)

    @cli.command()
    @click.argument("run_ids", nargs=-1)
    @JSON_OPT
    @click.pass_obj
    def scan(obj, run_ids, as_json):
        """Re-check stored runs against today's secret detectors (exit 14 if anything is found)."""
        from ..scan import scan as do_scan
        from .progress import Progress

        progress = Progress("scanning runs", enabled=None if not as_json else False)
        report = do_scan(obj.registry, list(run_ids) or None, progress=progress)
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            for f in report["findings"]:
                click.echo(f"{f['run_id']}  {f['where']}  {f['detector']} x{f['count']}")
            click.echo(f"scanned {report['runs_scanned']} runs, {len(report['findings'])} findings")
        return E.EXIT_FINDINGS if report["findings"] else 0

    @cli.command()
    @click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
    @click.option("--wait", "wait_", is_flag=True, help="Wait for another running gc instead of failing.")
    @JSON_OPT
    @click.pass_obj
    def gc(obj, dry_run, wait_, as_json):
        """Remove runs retention allows, then every blob no remaining run references."""
        from .progress import Progress

        progress = Progress("gc", enabled=None if not as_json else False)
        report = obj.registry.gc(dry_run=dry_run, wait=wait_, progress=progress)
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            verb = "would remove" if dry_run else "removed"
            click.echo(
                f"{verb} {report['runs_removed']} runs and {report['blobs_removed']} blobs "
                f"({report['bytes_freed']} bytes); kept {report['blobs_kept']} blobs; "
                f"{report['temps_removed']} temp files; {report['duration_s']:.2f}s"
            )
            if report["packs_removed"] or report["pack_blobs_unused"] or report["packs_unreadable"]:
                click.echo(
                    f"packs: {report['packs_removed']} removed ({report['packs_rewritten']} rewritten without their garbage); "
                    f"{report['pack_blobs_unused']} garbage blobs ({report['pack_bytes_unused']} bytes) left in packs too live to rewrite"
                    + (f"; {report['packs_unreadable']} unreadable packs kept (run casruns verify)" if report["packs_unreadable"] else "")
                )
            for s in report["strays"]:
                click.echo(f"stray: {s['path']}: {s['kind']} (not a run; skipped)")
            for m in report["missing"]:
                click.echo(f"blob_missing: {m['run_id']}: {m['where']} {m['address']}")
            for t in report["trees_unreadable"]:
                click.echo(f"tree_unreadable: {t['run_id']}: {t['address']}: {t['message']}")
            if not report["swept"]:
                click.echo(
                    f"nothing swept: {report['blobs_missing']} referenced blobs are missing and {len(report['trees_unreadable'])} "
                    "artifact trees cannot be read; every unreferenced blob is kept until they are restored "
                    "(casruns archive pull) or the runs naming them are removed"
                )
        return 0 if report["swept"] else E.EXIT_FINDINGS

    @cli.command()
    @click.argument("run_ids", nargs=-1)
    @click.option("--read-data", is_flag=True, help="Decompress and re-hash every blob checked.")
    @click.option("--quarantine", is_flag=True, help="Move corrupt blobs to <root>/quarantine.")
    @click.option("--against", metavar="SRC", help="Also compare the runs with their copies in archive SRC.")
    @JSON_OPT
    @click.pass_obj
    def verify(obj, run_ids, read_data, quarantine, against, as_json):
        """Check manifests and the blobs they reference (exit 14 if anything is wrong)."""
        from .progress import Progress

        progress = Progress("verify", enabled=None if not as_json else False)
        report = obj.registry.verify(list(run_ids) or None, read_data=read_data, quarantine=quarantine, against=against, progress=progress)
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            for p in report["problems"]:
                click.echo(f"{p['kind']}: {p.get('run_id') or '-'}: {p['message']}")
            click.echo(
                f"checked {report['runs_checked']} runs, {report['blobs_checked']} blobs"
                f"{' (data re-hashed)' if read_data else ''}; {len(report['problems'])} problems; "
                f"{report['orphans']} unreferenced blobs" + (f"; quarantined {len(report['quarantined'])}" if quarantine else "")
            )
        return 0 if report["ok"] else E.EXIT_FINDINGS

    @cli.command()
    @click.argument("run_id")
    @click.option("--for", "for_", metavar="DURATION", help="Keep the run this long after it finished.")
    @click.option("--until", metavar="TIME", help="Keep the run until this time (RFC 3339).")
    @JSON_OPT
    @click.pass_obj
    def retain(obj, run_id, for_, until, as_json):
        """Override a run's retention."""
        r = obj.registry.retain(run_id, for_=for_, until=until)
        if as_json:
            render.emit_json(r)
        else:
            ret = r["retention"]
            click.echo(f"{run_id}: kept until {ret['retain_until'] or 'finished + ' + str(ret['retain_for']) + 's'} ({ret['rule']})")

    @cli.command()
    @JSON_OPT
    @click.pass_obj
    def reap(obj, as_json):
        """End runs whose supervisor died; restart queued runs that lost theirs."""
        report = obj.registry.reap()
        if as_json:
            render.emit_json(report)
        else:
            click.echo(
                f"reaped {len(report['reaped'])}, restarted {len(report['restarted'])}, "
                f"failed {len(report['failed'])}, queue entries repaired {report['queue_repaired']}, "
                f"leftovers cleaned {report['cleaned']}"
            )

    @cli.command()
    @click.argument("run_id")
    @click.option("--stream", type=click.Choice(["stdout", "stderr", "transcript"]), default="stdout", show_default=True)
    @click.option("--follow", "-f", is_flag=True, help="Keep printing until the run is terminal.")
    @JSON_OPT
    @click.pass_obj
    def logs(obj, run_id, stream, follow, as_json):
        """Print a run's log (redacted); live while it runs. --json makes errors JSON."""
        out = sys.stdout.buffer
        for chunk in obj.registry.log_chunks(run_id, stream, follow=follow):
            out.write(chunk)
            out.flush()

    @cli.command()
    @click.argument("run_id")
    @JSON_OPT
    @click.pass_obj
    def artifacts(obj, run_id, as_json):
        """List a run's artifact tree."""
        tree = obj.registry.tree(run_id)
        m = obj.registry.manifest(run_id)
        if as_json:
            render.emit_json(
                {
                    "schema": "casruns/artifacts/v1",
                    "run_id": run_id,
                    "tree": (m.get("artifacts") or {}).get("tree"),
                    "files": tree.files,
                    "bytes": tree.total_size,
                    "entries": [e.to_json() for e in tree.entries],
                    "skipped": tree.skipped,
                }
            )
        else:
            for e in tree.entries:
                if e.type == "file":
                    click.echo(f"{e.mode:04o}  {e.size:>12}  {e.blake3[:16]}  {e.path}")
                else:
                    click.echo(f"link  {'':>12}  {'':16}  {e.path} -> {e.target}")
            click.echo(f"{tree.files} files, {tree.total_size} bytes")

    @cli.command()
    @click.argument("run_id")
    @click.argument("path")
    @JSON_OPT
    @click.pass_obj
    def cat(obj, run_id, path, as_json):
        """Write one artifact to stdout (verified; exit 7 if corrupt). --json makes errors JSON."""
        out = sys.stdout.buffer
        for chunk in obj.registry.cat(run_id, path):
            out.write(chunk)
        out.flush()

    @cli.command()
    @click.argument("run_id")
    @click.argument("dest", type=click.Path(file_okay=False))
    @JSON_OPT
    @click.pass_obj
    def export(obj, run_id, dest, as_json):
        """Materialize a finished run's artifacts and logs under DEST."""
        from .progress import Progress

        progress = Progress("export", enabled=None if not as_json else False)
        report = obj.registry.export(run_id, dest, progress=progress)
        progress.done()
        if as_json:
            render.emit_json(report)
        else:
            click.echo(f"exported {report['files']} files ({report['bytes']} bytes) to {report['dest']}")
            for r in report["refused"]:
                click.echo(f"refused {r['path']}: {r['reason']}", err=True)


def exit_for_status(status: str) -> int:
    return {
        "succeeded": 0,
        "failed": E.EXIT_RUN_FAILED,
        "timed_out": E.EXIT_RUN_TIMED_OUT,
        "cancelled": E.EXIT_RUN_CANCELLED,
    }.get(status, E.EXIT_WAIT_TIMEOUT)


def _stream_both(reg, run_id: str, quiet: bool) -> None:
    """Follow stdout and stderr of a run to ours until it is terminal."""
    run = reg.run_dir(run_id)
    fds: dict[str, int] = {}
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    while True:
        rec = reg.get(run_id)
        for stream in ("stdout", "stderr"):
            if stream not in fds:
                try:
                    fds[stream] = os.open(run.spool(stream), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
            while True:
                data = os.read(fds[stream], 1 << 16)
                if not data:
                    break
                if not quiet:
                    sinks[stream].write(data)
                    sinks[stream].flush()
        if rec["terminal"]:
            break
        time.sleep(0.1)
    for fd in fds.values():
        os.close(fd)
    for stream in ("stdout", "stderr"):
        if stream not in fds and not quiet:  # it ended before we could tail it: read the blob
            for chunk in reg.log_chunks(run_id, stream):
                sinks[stream].write(chunk)
            sinks[stream].flush()
