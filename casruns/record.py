"""The run record: what ``status``, ``list`` and ``submit`` print (schema ``casruns/run/v1``).

Built from a manifest plus the live facts that are deliberately *not* in the manifest while
a run is active (the heartbeat file's mtime, the spool files' mtimes), so a heartbeat never
rewrites the manifest. spec/run.schema.json is the contract; tests validate every output.
"""

from __future__ import annotations

import time

from . import manifest as mf
from .config import Config
from .timefmt import format_ts, parse_ts

SCHEMA = "casruns/run/v1"


def retention_of(m: dict, config: Config, now: float | None = None) -> dict:
    """When a run may be cleaned up, and which rule says so."""
    ret = m.get("retention") or {}
    promoted = bool(ret.get("promoted"))
    history = ret.get("history") or []
    last = next((h for h in reversed(history) if h.get("action") == "promote"), None) if promoted else None
    out = {
        "promoted": promoted,
        "promoted_at": last.get("at") if last else None,
        "promoted_by": last.get("by") if last else None,
        "promotion_reason": last.get("reason") if last else None,
        "history": [dict(h) for h in history],
        "retain_for": ret.get("retain_for"),
        "retain_until": None,
        "cleanup_eligible": False,
        "cleanup_eligible_at": None,
        "rule": None,
    }
    status = m.get("status")
    if promoted:
        out["rule"] = "promoted"
        return out
    if status not in mf.TERMINAL:
        out["rule"] = "active"
        return out
    finished = m.get("finished_at") or m.get("updated_at")
    if ret.get("retain_until"):
        until = parse_ts(ret["retain_until"])
        out["rule"] = "retain_until"
    else:
        if ret.get("retain_for") is not None:
            keep = float(ret["retain_for"])
            out["rule"] = "retain_for"
        else:
            keep = config.retention.get(status, config.retention.get("default", 7 * 86400.0))
            out["rule"] = f"status:{status}"
        until = parse_ts(finished) + keep
    now = time.time() if now is None else now
    out["retain_until"] = format_ts(until)
    out["cleanup_eligible_at"] = out["retain_until"]
    out["cleanup_eligible"] = now >= until
    return out


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


def build(m: dict, config: Config, *, heartbeat: float | None = None, activity: float | None = None) -> dict:
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
        "exit_code": m.get("exit_code"),
        "signal": m.get("signal"),
        "provider": m.get("provider"),
        "attempt": m.get("attempt", 1),
        "resumed_from": m.get("resumed_from"),
        "replay_of": m.get("replay_of"),
        "labels": dict(m.get("labels") or {}),
        "runtime": dict(m.get("runtime") or {}),
        "preview": dict(m.get("preview") or {}),
        "artifacts": (
            {"tree": arts.get("tree"), "files": arts.get("files", 0), "bytes": arts.get("bytes", 0)} if arts else None
        ),
        "logs": {s: _ref(logs.get(s)) for s in ("stdout", "stderr", "transcript")},
        "retention": retention_of(m, config),
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
