"""Retention: when a finished run may be removed, and which rule says so.

Rules, first match wins (spec/format.md, "Retention"):

1. a promoted run is never eligible (``promoted``);
2. a run that is not terminal is never eligible (``active``);
3. ``retention.retain_until`` in the manifest (``casruns retain --until``);
4. ``retention.retain_for`` (``submit --retain-for``, ``casruns retain --for``), from finish;
5. the config's duration for the run's terminal status (``status:<status>``), from finish.

Then ``[retention.keep_last]`` in the config (``suite = 5``) keeps the newest N terminal,
unpromoted runs of each value of that label whatever their age (``keep_last:<label>``).

Clocks (spec/format.md, "Retention", "Whose clock"). ``finished_at`` was written by whatever
clock the supervisor had; trusting it alone let a supervisor 30 days behind (or a gc 30 days
ahead) make a run eligible the moment it finished. So a run whose time is up is eligible only
once gc has itself seen it terminal for the rule's *hold*: gc records its first sighting in
``runs/<id>/gc-seen.json`` (:func:`write_sighting`: its wall clock, and the boot id and
``CLOCK_BOOTTIME``, which no wall-clock jump moves), and elapsed time since then is measured by
:meth:`Sighting.elapsed`. ``status`` reads the same file (never writes it), so it reports what
gc would do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

from . import manifest as mf
from .config import Config
from .timefmt import format_ts, parse_ts

SEEN_FILE = "gc-seen.json"  # runs/<id>/gc-seen.json: gc's first sighting of the run as terminal
SEEN_SCHEMA = "casruns/gc-seen/v1"


def wall_clock() -> float:
    """The wall clock retention and gc judge by: ``time.time``, read in one place (tests skew
    it by replacing ``time.time``, which is what a gc whose clock is wrong sees)."""
    return time.time()


def boot_clock() -> tuple[str | None, float | None]:
    """(this boot's id, seconds since boot including suspend), or Nones where unavailable.

    ``CLOCK_BOOTTIME`` only moves forward at the real rate, whatever is done to the wall
    clock, so within one boot it measures elapsed time that no clock jump can inflate."""
    from .locking import boot_id

    try:
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        since_boot = None
    return (boot_id() or None), since_boot


class Sighting:
    """When gc first saw a run terminal: its wall time, and where the boot clock stood."""

    __slots__ = ("seen_at", "boot_id", "boottime")

    def __init__(self, seen_at: float, boot_id: str | None = None, boottime: float | None = None) -> None:
        self.seen_at, self.boot_id, self.boottime = seen_at, boot_id, boottime

    def elapsed(self, now: float, boot: tuple[str | None, float | None]) -> float | None:
        """Seconds since the sighting, or None when the sighting is in the future (it was
        made by a clock ahead of this one, so nothing measured from it can be trusted).

        Within the same boot it is the smaller of the wall-clock and boot-clock differences:
        a wall clock set forward since cannot make a run older than it is."""
        wall = now - self.seen_at
        if wall < 0:
            return None
        if self.boot_id and self.boottime is not None and boot[0] == self.boot_id and boot[1] is not None:
            since = boot[1] - self.boottime
            if since < 0:
                return None  # not the same boot after all (or a forged file): trust neither
            return min(wall, since)
        return wall

    def to_bytes(self) -> bytes:
        doc = {"schema": SEEN_SCHEMA, "seen_at": format_ts(self.seen_at), "boot_id": self.boot_id, "boottime": self.boottime}
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def sighting_path(run_path: str) -> str:
    return os.path.join(run_path, SEEN_FILE)


def read_sighting(run_path: str) -> Sighting | None:
    """The sighting recorded in ``run_path``, or None if there is none that can be trusted
    (missing, a stray, torn by a crash, unparseable: each means "not seen yet")."""
    from . import fsutil
    from .errors import CasrunsError

    try:
        doc = json.loads(fsutil.read_regular(sighting_path(run_path), limit=4096))
        if not isinstance(doc, dict) or doc.get("schema") != SEEN_SCHEMA:
            return None
        boot_id, boottime = doc.get("boot_id"), doc.get("boottime")
        return Sighting(
            parse_ts(doc["seen_at"]),
            boot_id if isinstance(boot_id, str) else None,
            float(boottime) if isinstance(boottime, (int, float)) and not isinstance(boottime, bool) else None,
        )
    except (OSError, CasrunsError, ValueError, KeyError, TypeError):
        return None


def write_sighting(run_path: str, now: float, boot: tuple[str | None, float | None]) -> Sighting:
    """Record that gc sees the run terminal now. Not synced: a sighting lost in a crash is
    only made again later, which keeps the run longer, never shorter. Raises RegistryError."""
    from . import fsutil

    s = Sighting(now, boot[0], boot[1])
    path = sighting_path(run_path)
    fsutil.atomic_write(path, s.to_bytes(), durable=False)
    try:
        os.utime(path, (now, now))  # its mtime is the time it records: a stat tells a sighting in the future
    except OSError:
        pass
    return s


_LOOKUP = object()  # retention_of's default: read the sighting from the registry the config belongs to


def retention_of(
    m: dict,
    config: Config,
    now: float | None = None,
    kept_by: str | None = None,
    sighting: "Sighting | None | object" = _LOOKUP,
    boot: tuple[str | None, float | None] | None = None,
) -> dict:
    """When a run may be cleaned up, and which rule says so.

    ``kept_by`` names a keep-last rule that protects this run (``keep_last:suite``); only a
    caller that sees every run can know it (:func:`keep_last_protected`). It matters only
    once the run's time is up, so callers compute it only then.

    ``sighting``: gc's first sighting of the run as terminal (None: not seen yet, judged as if
    seen now). By default it is read from ``runs/<id>/gc-seen.json`` of the config's registry,
    and only once the record's own time is up (before that it cannot matter).
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
    if promoted:
        out["rule"] = "promoted"
        return out
    by_record = record_until(m, config)
    if by_record is None:
        out["rule"] = "active"
        return out
    out["rule"], until, keep = by_record
    now = wall_clock() if now is None else now
    out["retain_until"] = format_ts(until)
    if now < until:
        # not yet by the record's own time (a finished_at in the future keeps it longer);
        # the hold below can only push this later
        out["cleanup_eligible_at"] = out["retain_until"]
        return out
    if kept_by:
        # past its time, but among the newest N of its label value: kept until newer runs
        # of that value push it out (no fixed time to announce)
        out["rule"] = kept_by
        return out
    # The record says its time is up. Its times came from the writer's clock, so also require
    # that gc has seen it terminal for the rule's hold, measured by gc's own clocks.
    if sighting is _LOOKUP:
        root = getattr(config, "root", None)
        sighting = read_sighting(os.path.join(root, "runs", m["run_id"])) if root else None
    boot = boot_clock() if boot is None else boot
    elapsed = sighting.elapsed(now, boot) if isinstance(sighting, Sighting) else None
    if elapsed is None:
        # not seen yet (or seen by a clock ahead of ours): judged as if seen now, and no fixed
        # time to announce until a gc has seen it
        hold = until - now if keep is None else keep
        out["cleanup_eligible"] = hold <= 0
        out["cleanup_eligible_at"] = out["retain_until"] if hold <= 0 else None
        return out
    seen_at = sighting.seen_at
    hold = until - seen_at if keep is None else keep  # retain_until: the time left when gc first saw it
    left = hold - elapsed
    # by the wall clock, unless the boot clock says less time has passed (a wall clock set forward)
    at = seen_at + hold if elapsed > now - seen_at - 1.0 else now + left
    out["cleanup_eligible_at"] = format_ts(max(until, at))
    out["cleanup_eligible"] = left <= 0
    return out


def record_until(m: dict, config: Config) -> tuple[str, float, float | None] | None:
    """(rule, the time the record's own fields keep a terminal run until, the rule's duration
    or None for ``retain_until``); None for a run that is not terminal. Ignores promotion."""
    status = m.get("status")
    if status not in mf.TERMINAL:
        return None
    ret = m.get("retention") or {}
    if ret.get("retain_until"):
        return "retain_until", parse_ts(ret["retain_until"]), None
    if ret.get("retain_for") is not None:
        keep, rule = float(ret["retain_for"]), "retain_for"
    else:
        keep, rule = config.retention.get(status, config.retention.get("default", 7 * 86400.0)), f"status:{status}"
    return rule, parse_ts(m.get("finished_at") or m.get("updated_at")) + keep, keep


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
