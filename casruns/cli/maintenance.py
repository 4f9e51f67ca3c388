"""Commands that look after the registry itself: init, migrate, reap, gc, verify."""

from __future__ import annotations

import click

from .. import errors as E
from . import options, render
from .options import json_option
from .progress import progress


def register(cli: click.Group) -> None:
    for add in (_add_init, _add_migrate, _add_reap, _add_gc, _add_verify):
        add(cli)


def _add_init(cli: click.Group) -> None:
    @cli.command()
    @json_option
    @click.pass_obj
    def init(obj, as_json):
        """Create the registry (it is also created on first write)."""
        created = obj.registry.init()
        root = obj.registry.root
        render.emit(
            as_json,
            {"schema": "casruns/init/v1", "root": root, "created": created},
            lambda doc: f"{'created' if created else 'exists'}: {root}",
        )


def _add_migrate(cli: click.Group) -> None:
    @cli.command()
    @json_option
    @click.pass_obj
    def migrate(obj, as_json):
        """Move an older registry to this casruns' format (older casruns then refuse it)."""
        render.emit(as_json, obj.registry.migrate(), _migrate_line)


def _migrate_line(r: dict) -> str:
    if r["migrated"]:
        return f"migrated {r['root']} from format {r['from_version']} to {r['to_version']}"
    return f"{r['root']} is already at format {r['to_version']}"


def _add_reap(cli: click.Group) -> None:
    @cli.command()
    @json_option
    @click.pass_obj
    def reap(obj, as_json):
        """End runs whose supervisor died; restart queued runs that lost theirs."""
        render.emit(as_json, obj.registry.reap(), _reap_line)


def _reap_line(r: dict) -> str:
    return (
        f"reaped {len(r['reaped'])}, restarted {len(r['restarted'])}, "
        f"failed {len(r['failed'])}, queue entries repaired {r['queue_repaired']}, "
        f"leftovers cleaned {r['cleaned']}"
    )


def _add_gc(cli: click.Group) -> None:
    @cli.command()
    @click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
    @click.option("--wait", "wait_", is_flag=True, help="Wait for another running gc instead of failing.")
    @json_option
    @click.pass_obj
    def gc(obj, dry_run, wait_, as_json):
        """Remove runs retention allows, then every blob no remaining run references."""
        with progress("gc", as_json) as p:
            report = obj.registry.gc(dry_run=dry_run, wait=wait_, progress=p)
        render.emit(as_json, report, lambda r: _gc_lines(r, dry_run))
        return 0 if report["swept"] else E.EXIT_FINDINGS


def _gc_lines(r: dict, dry_run: bool):
    verb = "would remove" if dry_run else "removed"
    yield (
        f"{verb} {r['runs_removed']} runs and {r['blobs_removed']} blobs "
        f"({r['bytes_freed']} bytes); kept {r['blobs_kept']} blobs; "
        f"{r['temps_removed']} temp files; {r['duration_s']:.2f}s"
    )
    if r["packs_removed"] or r["pack_blobs_unused"] or r["packs_unreadable"]:
        yield (
            f"packs: {r['packs_removed']} removed ({r['packs_rewritten']} rewritten without their garbage); "
            f"{r['pack_blobs_unused']} garbage blobs ({r['pack_bytes_unused']} bytes) left in packs too live to rewrite"
            + (f"; {r['packs_unreadable']} unreadable packs kept (run casruns verify)" if r["packs_unreadable"] else "")
        )
    for s in r["strays"]:
        yield f"stray: {s['path']}: {s['kind']} (not a run; skipped)"
    for m in r["missing"]:
        yield f"blob_missing: {m['run_id']}: {m['where']} {m['address']}"
    for t in r["trees_unreadable"]:
        yield f"tree_unreadable: {t['run_id']}: {t['address']}: {t['message']}"
    if not r["swept"]:
        yield (
            f"nothing swept: {r['blobs_missing']} referenced blobs are missing and {len(r['trees_unreadable'])} "
            "artifact trees cannot be read; every unreferenced blob is kept until they are restored "
            "(casruns archive pull) or the runs naming them are removed"
        )


def _add_verify(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_ids", nargs=-1)
    @click.option("--read-data", is_flag=True, help="Decompress and re-hash every blob checked.")
    @click.option("--quarantine", is_flag=True, help="Move corrupt blobs to <root>/quarantine.")
    @click.option("--against", metavar="SRC", help="Also compare the runs with their copies in archive SRC.")
    @json_option
    @click.pass_obj
    def verify(obj, run_ids, read_data, quarantine, against, as_json):
        """Check manifests and the blobs they reference (exit 14 if anything is wrong)."""
        with progress("verify", as_json) as p:
            report = obj.registry.verify(
                options.optional_run_ids(run_ids), read_data=read_data, quarantine=quarantine, against=against, progress=p
            )
        render.emit(as_json, report, lambda r: _verify_lines(r, read_data, quarantine))
        return 0 if report["ok"] else E.EXIT_FINDINGS


def _verify_lines(r: dict, read_data: bool, quarantine: bool):
    for p in r["problems"]:
        yield f"{p['kind']}: {p.get('run_id') or '-'}: {p['message']}"
    yield (
        f"checked {r['runs_checked']} runs, {r['blobs_checked']} blobs"
        f"{' (data re-hashed)' if read_data else ''}; {len(r['problems'])} problems; "
        f"{r['orphans']} unreferenced blobs" + (f"; quarantined {len(r['quarantined'])}" if quarantine else "")
    )
