"""Rendering: records and reports as text for people or JSON for machines.

Shared by the click commands and the click-free fast path of ``status``/``list``, so both
print byte-identical output. Imports nothing heavy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable  # already loaded at startup: free on the fast path

from ..errors import CasrunsError


def dump_json(obj) -> str:
    text = json.dumps(obj, sort_keys=False, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # lone surrogates (bytes of non-UTF-8 input, e.g. a run id): escaped, the output stays
        # valid UTF-8 and valid JSON
        text = json.dumps(obj, sort_keys=False, separators=(",", ":"), ensure_ascii=True)
    return text


def emit_json(obj) -> None:
    sys.stdout.write(dump_json(obj) + "\n")


def emit(as_json: bool, doc, text: Callable[[dict], str | Iterable[str]] | None = None) -> None:
    """A command's result: ``doc`` as one JSON line under ``--json``, else ``text(doc)`` for people.

    :param text: the lines (or one string) a person reads, built from ``doc`` only when they
        are printed; None when the command prints nothing else without ``--json`` (``run``:
        the output streamed already).
    """
    if as_json:
        emit_json(doc)
    elif text is not None:
        echo(text(doc))


def echo(lines: str | Iterable[str], *, err: bool = False) -> None:
    """Text for people (one line, or lines printed as they come), on stdout or stderr, through
    ``click.echo``: it strips terminal escapes (from a run id, a label, a path) when the stream
    is not a terminal. Only click commands call it; the fast path never imports click."""
    import click

    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(line, err=err)


def error(err: CasrunsError, as_json: bool) -> int:
    """Report an error: one line on stderr, or a JSON object on stdout with --json."""
    if as_json:
        emit_json(err.to_json())
    else:
        sys.stderr.write(f"casruns: error: {err.message}\n")
    return err.exit_code


def record_text(r: dict) -> str:
    lines = [f"{r['run_id']}  {r['status']}"]
    def add(label, value):
        if value not in (None, "", {}, []):
            lines.append(f"  {label:<15} {value}")
    add("provider", r.get("provider"))
    add("command", " ".join(r["replay"]["argv"]))
    add("labels", " ".join(f"{k}={v}" for k, v in sorted(r["labels"].items())))
    add("created", r["created_at"])
    add("started", r["started_at"])
    add("finished", r["finished_at"])
    if not r["terminal"]:
        add("heartbeat", r["heartbeat_at"])
        add("last activity", r["last_activity_at"])
        add("deadline", r.get("deadline_at"))
    add("exit code", r["exit_code"])
    add("signal", r.get("signal"))
    if r.get("attempt", 1) != 1:
        add("attempt", r["attempt"])
    add("resumed from", r.get("resumed_from"))
    add("replay of", r.get("replay_of"))
    if r["artifacts"]:
        a = r["artifacts"]
        add("artifacts", f"{a['files']} files, {a['bytes']} bytes (tree {a['tree'][:16]})")
    logs = [f"{k} {v['size']}B" for k, v in r["logs"].items() if v]
    add("logs", ", ".join(logs))
    ret = r["retention"]
    if ret["promoted"]:
        add("retention", "promoted (kept)")
    elif ret["retain_until"]:
        add("retention", f"until {ret['retain_until']} ({ret['rule']})" + (", eligible for cleanup" if ret["cleanup_eligible"] else ""))
    if r.get("cancel"):
        add("cancel", f"requested {r['cancel'].get('requested_at')}: {r['cancel'].get('reason')}")
    if r["error"]:
        add("error", f"{r['error']['code']}: {r['error']['message']}")
    return "\n".join(lines)


def list_text(records: list[dict]) -> str:
    if not records:
        return "no runs"
    rows = [("RUN ID", "STATUS", "CREATED", "EXIT", "LABELS")]
    for r in records:
        rows.append(
            (
                r["run_id"],
                r["status"],
                (r["created_at"] or "")[:19],
                "" if r["exit_code"] is None else str(r["exit_code"]),
                " ".join(f"{k}={v}" for k, v in sorted(r["labels"].items())),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(row)).rstrip() for row in rows)


def status_output(records: list[dict], errors: list[CasrunsError], as_json: bool) -> int:
    """``status`` prints one record per run id (JSON: one object per line)."""
    for r in records:
        if as_json:
            emit_json(r)
        else:
            sys.stdout.write(record_text(r) + "\n")
    code = 0
    for e in errors:
        code = error(e, as_json) if code == 0 else code
    return code


def list_output(records: list[dict], as_json: bool, errors: list[dict] | None = None, cursor: str | None = None) -> int:
    """``list``: runs newest first; unreadable runs are reported, never hide the others.
    ``cursor``: the event journal's position taken before reading (what to follow from).

    Exit 0 when every run was read, 6 (registry error) when some could not be."""
    errors = errors or []
    if as_json:
        doc = {"schema": "casruns/list/v1", "cursor": cursor or "0" * 16, "runs": records}
        if errors:
            doc["errors"] = errors
        emit_json(doc)
    else:
        sys.stdout.write(list_text(records) + "\n")
        for e in errors:
            sys.stderr.write(f"casruns: error: run {e['run_id']}: {e['message']}\n")
    return 6 if errors else 0


FORMATS = ("casruns", "homeboy")  # ``status``/``list --format``


def lost_after(reg) -> float | None:
    """The registry's ``lost_after`` for ``heartbeat.stale_after_seconds`` (None when the
    config cannot be read: the records were read, so the heartbeat just goes without it)."""
    try:
        return reg.config.lost_after
    except CasrunsError:
        return None


def homeboy_output(records: list[dict], errors: list, as_json: bool, stale_after: float | None = None) -> int:
    """``status``/``list --format homeboy``: one ``homeboy/run-lifecycle-record/v1`` per line
    (the format is JSON with or without ``--json``, which only makes the errors JSON: spec/homeboy.md).

    :param errors: ``status``'s CasrunsErrors, or ``list``'s unreadable runs (``{"run_id","code","message"}``:
        each an error line, and exit 6, as ``list`` does).
    :param stale_after: the registry's ``lost_after`` (seconds), reported as ``heartbeat.stale_after_seconds``.
    """
    from ..homeboy import from_record

    stale = None if stale_after is None else -int(-stale_after // 1)  # rounded up, no math import
    for r in records:
        emit_json(from_record(r, stale_after_seconds=stale))
    code = 0
    for e in errors:
        if isinstance(e, CasrunsError):
            code = error(e, as_json) if code == 0 else code
            continue
        if as_json:
            err = {"code": e["code"], "message": f"run {e['run_id']}: {e['message']}", "exit_code": 6, "details": {"run_id": e["run_id"]}}
            emit_json({"schema": "casruns/error/v1", "error": err})
        else:
            sys.stderr.write(f"casruns: error: run {e['run_id']}: {e['message']}\n")
        code = code or 6
    return code
