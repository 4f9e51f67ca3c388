"""The fleet archive's own settings: ``config.toml`` in the archive (spec/archive-gc.md, "Config").

It uses the registry's retention vocabulary, judged by the archive's gc in the store's clock::

    [retention]             # per terminal status: how long an unpromoted archived run is kept
    succeeded = "90d"       #   after it finished; a status not listed is kept for ever
    failed = "30d"
    default = "30d"         #   any terminal status not listed above
    promoted = "400d"       # promoted runs: kept until unpromoted unless this is set (from the promotion)
    [retention.keep_last]   # the newest N finished, unpromoted runs of each value of a label
    suite = 5
    [gc]
    grace = "1h"            # a blob no manifest references is deleted no sooner than this after the mark
    lease = "60s"           # the period of push leases, the gc lock and sweep objects (rewritten twice a period)

An archive without ``config.toml`` expires no run; its gc still removes unreferenced blobs.
``casruns archive config DEST --set KEY=VALUE --unset KEY`` edits it with a conditional write,
so two machines editing at once never lose each other's change.
"""

from __future__ import annotations

import tomllib

from . import manifest as mf
from .errors import InvalidInput, UnsupportedFormat
from .timefmt import parse_duration

KEY = "config.toml"
LIMIT = 1 << 20
SCHEMA = "casruns/archive-config/v1"
GRACE = 3600.0
LEASE = 60.0
MIN_LEASE = 1.0


class ArchiveSettings:
    """The parsed ``config.toml`` (defaults where it is silent)."""

    def __init__(self, raw: dict | None = None, where: str = KEY) -> None:
        raw = raw or {}
        self.raw = raw
        self.retention: dict[str, float] = {}
        self.promoted: float | None = None
        self.keep_last: dict[str, int] = {}
        self.grace = GRACE
        self.lease = LEASE
        ret = raw.get("retention") or {}
        gc = raw.get("gc") or {}
        if not isinstance(ret, dict) or not isinstance(gc, dict):
            raise InvalidInput(f"{where}: [retention] and [gc] must be tables")
        for key, value in ret.items():
            if key == "keep_last":
                if not isinstance(value, dict):
                    raise InvalidInput(f"{where}: [retention.keep_last] must be a table of label = count")
                for label, n in value.items():
                    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                        raise InvalidInput(f"{where}: retention.keep_last.{label} must be a whole number")
                    self.keep_last[str(label)] = n
            elif key == "promoted":
                self.promoted = _duration(value, f"{where}: retention.promoted")
            elif key in mf.TERMINAL or key == "default":
                self.retention[key] = _duration(value, f"{where}: retention.{key}")
            else:
                raise InvalidInput(f"{where}: retention.{key}: not a terminal status (succeeded, failed, timed_out, cancelled, default) or promoted")
        for key, value in gc.items():
            if key == "grace":
                self.grace = _duration(value, f"{where}: gc.grace")
            elif key == "lease":
                self.lease = _duration(value, f"{where}: gc.lease")
                if self.lease < MIN_LEASE:
                    raise InvalidInput(f"{where}: gc.lease must be at least {MIN_LEASE:.0f}s (it is how often leases are rewritten)")
            else:
                raise InvalidInput(f"{where}: gc.{key}: unknown setting (grace, lease)")

    def keep_for(self, status: str) -> float | None:
        return self.retention.get(status, self.retention.get("default"))

    def to_json(self, url: str) -> dict:
        return {
            "schema": SCHEMA, "archive": url,
            "retention": {**{k: v for k, v in sorted(self.retention.items())}, "promoted": self.promoted},
            "keep_last": dict(sorted(self.keep_last.items())), "grace": self.grace, "lease": self.lease,
        }


def _duration(value, what: str) -> float:
    if value in ("forever", "never"):
        raise InvalidInput(f"{what}: leave it unset to keep runs for ever")
    try:
        return parse_duration(value)
    except InvalidInput as e:
        raise InvalidInput(f"{what}: {e.message}") from None


def read(remote) -> tuple[ArchiveSettings, str | None]:
    """The archive's settings and the version of ``config.toml`` they came from (None: absent)."""
    from .errors import RunNotFound

    got = remote.stat(KEY)
    if got is None:
        return ArchiveSettings(), None
    try:
        raw = tomllib.loads(remote.get_bytes(KEY, limit=LIMIT).decode("utf-8"))
    except RunNotFound:
        return ArchiveSettings(), None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedFormat(f"{remote.url}/{KEY} is not UTF-8 TOML: {e}") from None
    return ArchiveSettings(raw, f"{remote.url}/{KEY}"), got.version


def edit(remote, sets: list[str], unsets: list[str], *, attempts: int = 10) -> ArchiveSettings:
    """Apply ``KEY=VALUE`` settings and removals (dotted keys: ``retention.succeeded``,
    ``retention.keep_last.suite``, ``gc.grace``), validated, written only over the version read."""
    import tomli_w

    for _ in range(attempts):
        settings, version = read(remote)
        raw = _copy(settings.raw)
        for item in sets:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise InvalidInput(f"--set {item!r}: use KEY=VALUE, e.g. retention.succeeded=90d")
            path = key.strip().split(".")
            if path[:2] == ["retention", "keep_last"] and len(path) == 3:
                try:
                    parsed: object = int(value)
                except ValueError:
                    raise InvalidInput(f"--set {item!r}: a keep-last count is a whole number") from None
            else:
                parsed = value.strip()
            if len(path) not in (2, 3) or path[0] not in ("retention", "gc") or (len(path) == 3 and path[1] != "keep_last"):
                raise InvalidInput(f"--set {item!r}: unknown setting (retention.<status>, retention.promoted, retention.keep_last.<label>, gc.grace, gc.lease)")
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = parsed
        for key in unsets:
            path = key.strip().split(".")
            node = raw
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(path[-1], None)
        new = ArchiveSettings(raw, "the new config")  # refuse before writing anything
        body = f"# casruns archive settings ({SCHEMA}); see spec/archive-gc.md\n".encode() + tomli_w.dumps(raw).encode()
        if remote.put_if(body, KEY, version) is not None:
            return new
    raise InvalidInput(f"{remote.url}/{KEY} kept changing while it was being edited; try again")


def _copy(raw: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in raw.items()}
