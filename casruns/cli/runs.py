"""Commands that start, watch and stop runs: submit, run, status, list, wait, cancel, replay,
resume, logs."""

from __future__ import annotations

import sys

import click

from .. import errors as E
from ..notify import RECHECK  # wait and run wake on a change; they look for a lost supervisor this often
from . import options, render
from .options import json_option


def register(cli: click.Group) -> None:
    for add in (_add_submit, _add_run, _add_status, _add_list, _add_wait, _add_cancel, _add_replay, _add_resume, _add_logs):
        add(cli)


def exit_for_status(status: str) -> int:
    """The exit code of ``run`` and ``wait`` for a run that ended with ``status`` (the status table)."""
    from ..manifest import exit_code_for

    return exit_code_for(status)


def _submit_request(obj, command, labels, **kw) -> dict:
    reg = obj.registry
    return reg.submit(list(command), labels=options.parse_labels(labels), **kw)


def _run_id_line(r: dict) -> str:
    return r["run_id"]


def _status_line(r: dict) -> str:
    return f"{r['run_id']}  {r['status']}"


def _add_submit(cli: click.Group) -> None:
    @cli.command(context_settings={"ignore_unknown_options": False})
    @options.submit_options
    @json_option
    @click.pass_obj
    def submit(obj, command, labels, as_json, **kw):
        """Record a run and start it in the background; prints its record at once.

        Put the command after --:  casruns submit --label suite=unit -- make test
        """
        render.emit(as_json, _submit_request(obj, command, labels, **kw), _run_id_line)


def _add_run(cli: click.Group) -> None:
    @cli.command()
    @options.submit_options
    @json_option
    @click.pass_obj
    def run(obj, command, labels, as_json, **kw):
        """Like submit, but stream the output here and exit with the run's outcome.

        Exit codes: 0 succeeded, 10 failed, 11 timed_out, 12 cancelled. Ctrl-C cancels the run.
        """
        reg = obj.registry
        rid = _submit_request(obj, command, labels, **kw)["run_id"]
        try:
            _follow(reg, rid, () if as_json else ("stdout", "stderr"))
        except KeyboardInterrupt:
            reg.cancel(rid, reason="interrupted (Ctrl-C on casruns run)")
            _follow(reg, rid, ())  # until the supervisor has stopped it
        final = reg.get(rid)
        render.emit(as_json, final)
        return exit_for_status(final["status"])


def _follow(reg, run_id: str, streams: tuple[str, ...]) -> None:
    """Copy a run's streams to ours until it is terminal (none: just wait for the end)."""
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    for stream, data in reg.follow(run_id, streams, poll=RECHECK):
        sinks[stream].write(data)
        sinks[stream].flush()


_format_option = click.option(
    "--format", "fmt", type=click.Choice(render.FORMATS), default="casruns", show_default=True,
    help="casruns: the run record; homeboy: Homeboy's homeboy/run-lifecycle-record/v1, one JSON per line (spec/homeboy.md).",
)


def _add_status(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_ids", nargs=-1, required=True)
    @_format_option
    @json_option
    @click.pass_obj
    def status(obj, run_ids, fmt, as_json):
        """Show runs (JSON: one object per line). Exits 0 whatever the runs' outcome."""
        records, errs = [], []
        for rid in run_ids:
            try:
                records.append(obj.registry.get(rid))
            except E.CasrunsError as e:
                errs.append(e)
        if fmt == "homeboy":
            return render.homeboy_output(records, errs, as_json, render.lost_after(obj.registry))
        return render.status_output(records, errs, as_json)


def _add_list(cli: click.Group) -> None:
    @cli.command(name="list")
    @options.list_filter_options
    @click.option("--chain", metavar="RUN_ID", help="The attempts of RUN_ID's chain (resume links), first first.")
    @_format_option
    @json_option
    @click.pass_obj
    def list_(obj, statuses, labels, since, limit, promoted, chain, fmt, as_json):
        """List runs, newest first."""
        reg = obj.registry
        cursor = reg.events_cursor()  # before reading: following from it misses nothing
        errors: list = []
        if chain:
            records = reg.chain(chain)
        else:
            records = reg.list(
                statuses=statuses, labels=options.parse_labels(labels), since=since, limit=limit, promoted=promoted, errors=errors
            )
        if fmt == "homeboy":
            return render.homeboy_output(records, errors, as_json, render.lost_after(reg))
        return render.list_output(records, as_json, errors, cursor)


def _add_wait(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_ids", nargs=-1, required=True)
    @click.option("--timeout", help="Give up after this long (exit 13).")
    @json_option
    @click.pass_obj
    def wait(obj, run_ids, timeout, as_json):
        """Block until the runs are terminal; exit with the worst outcome's code."""
        records, done = obj.registry.wait(list(run_ids), timeout=options.parse_duration(timeout), poll=RECHECK)
        for r in records:
            render.emit(as_json, r, _status_line)
        if not done:
            return E.EXIT_WAIT_TIMEOUT
        return max((exit_for_status(r["status"]) for r in records), default=0)


_CANCEL_TEXT = {
    "cancelled": "cancelled",
    "requested": "cancel requested; the supervisor is stopping the run",
    "already_requested": "cancel was already requested",
    "already_terminal": "run is already {status}; nothing changed",
}


def _add_cancel(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.option("--reason", help="Why (recorded in the run).")
    @json_option
    @click.pass_obj
    def cancel(obj, run_id, reason, as_json):
        """Cancel a run (idempotent). A terminal run is left unchanged."""
        r, outcome = obj.registry.cancel(run_id, reason=reason)
        render.emit(
            as_json,
            {"schema": "casruns/cancel/v1", "run_id": run_id, "outcome": outcome, "run": r},
            lambda doc: f"{run_id}: {_CANCEL_TEXT[outcome].format(status=r['status'])}",
        )


def _add_replay(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.option("--run-id", "new_id", help="Id for the new run (idempotent, as in submit).")
    @json_option
    @click.pass_obj
    def replay(obj, run_id, new_id, as_json):
        """Submit a new run from RUN_ID's recipe; secrets and env values are read again from here."""
        render.emit(as_json, obj.registry.replay(run_id, run_id_new=new_id), _run_id_line)


def _add_resume(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @json_option
    @click.pass_obj
    def resume(obj, run_id, as_json):
        """Start the next attempt of a failed, timed-out or cancelled run, seeded with its artifacts."""
        render.emit(as_json, obj.registry.resume(run_id), _run_id_line)


def _add_logs(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_id")
    @click.option("--stream", type=click.Choice(["stdout", "stderr", "transcript"]), default="stdout", show_default=True)
    @click.option("--follow", "-f", is_flag=True, help="Keep printing until the run is terminal.")
    @click.option("--offset", type=int, default=0, metavar="N", help="Start at byte N of the stream (resume).")
    @json_option
    @click.pass_obj
    def logs(obj, run_id, stream, follow, offset, as_json):
        """Print a run's log (redacted); live while it runs. --json: chunks as casruns/log-chunk/v1 lines."""
        reg = obj.registry
        chunks = reg.log_chunks(run_id, stream, follow=follow, offset=offset)
        if not as_json:
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
                out.flush()
            return
        # the status read before the bytes: the end line never claims an end it did not read to
        before = reg.get(run_id)
        pos = offset
        for chunk in chunks:
            render.emit_json(log_chunk_doc(run_id, stream, pos, chunk))
            sys.stdout.flush()
            pos += len(chunk)
        rec = reg.get(run_id) if follow else before
        size = ((rec.get("logs") or {}).get(stream) or {}).get("size") if rec["terminal"] else None
        end = {"schema": LOG_CHUNK_SCHEMA, "run_id": run_id, "stream": stream, "offset": pos, "end": True, "status": rec["status"]}
        if size is not None and size < pos:  # --offset past the end of a finished log
            end["offset"] = size
        render.emit_json(end)


LOG_CHUNK_SCHEMA = "casruns/log-chunk/v1"


def log_chunk_doc(run_id: str, stream: str, offset: int, chunk: bytes) -> dict:
    """One chunk of ``logs --json`` (spec/log-chunk.schema.json): its text when it is valid
    UTF-8 on its own, else its bytes in base64 (a chunk that cuts a character is base64)."""
    try:
        encoding, data = "utf-8", chunk.decode("utf-8")
    except UnicodeDecodeError:
        import base64

        encoding, data = "base64", base64.b64encode(chunk).decode("ascii")
    return {"schema": LOG_CHUNK_SCHEMA, "run_id": run_id, "stream": stream, "offset": offset, "length": len(chunk),
            "encoding": encoding, "data": data}
