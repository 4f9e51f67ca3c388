"""The run record: what ``status``, ``list`` and ``submit`` print (schema ``casruns/run/v1``).

Built from a manifest plus the live facts that are deliberately *not* in the manifest while
a run is active (the heartbeat file's mtime, the spool files' mtimes), so a heartbeat never
rewrites the manifest. spec/run.schema.json is the contract; tests validate every output.
"""

from __future__ import annotations

from . import manifest as mf
from .config import Config
from .retention import retention_of
from .timefmt import format_ts

SCHEMA = "casruns/run/v1"


def replay_of(m: dict) -> dict:
    req = m.get("request") or {}
    return {
        "provider": m.get("provider"),
        "argv": list(req.get("argv") or []),
        "cwd": req.get("cwd"),
        "env_names": list(req.get("env_names") or []),
        "secret_env": list(req.get("secret_env") or []),
        "labels": dict(m.get("labels") or {}),
        "timeout": req.get("timeout"),
        "recipe": req.get("recipe"),
        "plugins": list(req.get("plugins") or []),
        "command": f"casruns replay {m['run_id']}",
    }


def build(
    m: dict, config: Config, *, heartbeat: float | None = None, activity: float | None = None, kept_by: str | None = None
) -> dict:
    status = m["status"]
    terminal = status in mf.TERMINAL
    logs = m.get("logs") or {}
    arts = m.get("artifacts")
    rec = {
        "schema": SCHEMA,
        "run_id": m["run_id"],
        "status": status,
        "terminal": terminal,
        "created_at": m.get("created_at"),
        "started_at": m.get("started_at"),
        "finished_at": m.get("finished_at"),
        "updated_at": m.get("updated_at"),
        "heartbeat_at": m.get("heartbeat_at") if terminal or heartbeat is None else format_ts(heartbeat),
        "last_activity_at": m.get("last_activity_at") if terminal or activity is None else format_ts(activity),
        "deadline_at": m.get("deadline_at"),
        "duration_s": m.get("duration_s"),
        "strays_killed": m.get("strays_killed"),
        "exit_code": m.get("exit_code"),
        "signal": m.get("signal"),
        "provider": m.get("provider"),
        "attempt": m.get("attempt", 1),
        "resumed_from": m.get("resumed_from"),
        "replay_of": m.get("replay_of"),
        "labels": dict(m.get("labels") or {}),
        "event_seq": int(m.get("event_seq") or 0),
        "incarnation": m.get("incarnation", ""),
        "origin": {"registry_id": (m.get("origin") or {}).get("registry_id"), "host": (m.get("origin") or {}).get("host")} if m.get("origin") else None,
        "runtime": dict(m.get("runtime") or {}),
        "preview": dict(m.get("preview") or {}),
        "artifacts": (
            {"tree": arts.get("tree"), "files": arts.get("files", 0), "bytes": arts.get("bytes", 0)} if arts else None
        ),
        "logs": {s: _ref(logs.get(s)) for s in ("stdout", "stderr", "transcript")},
        "retention": retention_of(m, config, kept_by=kept_by),
        "replay": replay_of(m),
        "cancel": dict(m["cancel"]) if m.get("cancel") else None,
        "error": {"code": m["error"].get("code"), "message": m["error"].get("message"), **{k: v for k, v in m["error"].items() if k not in ("code", "message")}}
        if m.get("error")
        else None,
    }
    return rec


def _ref(ref) -> dict | None:
    if not ref:
        return None
    return {"blake3": ref.get("blake3"), "size": ref.get("size")}
