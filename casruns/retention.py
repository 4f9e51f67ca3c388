"""Retention: when a finished run may be removed, and which rule says so.

Rules, first match wins (spec/format.md, "Retention"):

1. a promoted run is never eligible (``promoted``);
2. a run that is not terminal is never eligible (``active``);
3. ``retention.retain_until`` in the manifest (``casruns retain --until``);
4. ``retention.retain_for`` (``submit --retain-for``, ``casruns retain --for``), from finish;
5. the config's duration for the run's terminal status (``status:<status>``), from finish.

Then ``[retention.keep_last]`` in the config (``suite = 5``) keeps the newest N terminal,
unpromoted runs of each value of that label whatever their age (``keep_last:<label>``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from . import manifest as mf
from .config import Config
from .timefmt import format_ts, parse_ts


def retention_of(m: dict, config: Config, now: float | None = None, kept_by: str | None = None) -> dict:
    """When a run may be cleaned up, and which rule says so.

    ``kept_by`` names a keep-last rule that protects this run (``keep_last:suite``); only a
    caller that sees every run can know it (:func:`keep_last_protected`). It matters only
    once the run's time is up, so callers compute it only then.
    """
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
    if kept_by and now >= until:
        # past its time, but among the newest N of its label value: kept until newer runs
        # of that value push it out (no fixed time to announce)
        out["rule"] = kept_by
        return out
    out["cleanup_eligible_at"] = out["retain_until"]
    out["cleanup_eligible"] = now >= until
    return out



def safe_retention_of(m: dict, config: Config, **kw) -> dict | None:
    """:func:`retention_of`, or None for a manifest whose retention fields do not parse
    (such a run is never eligible for cleanup; verify reports it)."""
    from .errors import CasrunsError

    try:
        return retention_of(m, config, **kw)
    except (CasrunsError, TypeError, ValueError):
        return None


def keep_last_protected(manifests: Iterable[dict], config: Config) -> dict[str, str]:
    """Run ids that a keep-last rule protects, mapped to the rule's name."""
    if not config.keep_last:
        return {}
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for m in manifests:
        if m.get("status") not in mf.TERMINAL or (m.get("retention") or {}).get("promoted"):
            continue
        labels = m.get("labels") or {}
        for key in config.keep_last:
            if key in labels:
                groups.setdefault((key, labels[key]), []).append((m.get("finished_at") or m.get("created_at") or "", m["run_id"]))
    out: dict[str, str] = {}
    for (key, _), runs in groups.items():
        runs.sort(reverse=True)
        for _, rid in runs[: config.keep_last[key]]:
            out.setdefault(rid, f"keep_last:{key}")
    return out
