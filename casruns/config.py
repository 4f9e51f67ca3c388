"""The registry's configuration (``<root>/config.toml``) and the format file.

Config keys (spec/format.md, "Config"), all optional:

    max_running = 4            # concurrently active runs; default: the CPU count
    kill_grace = "5s"          # SIGTERM to SIGKILL on timeout and cancel
    heartbeat_interval = "1s"
    lost_after = "30s"         # a supervisor on another host is lost after this silence
    teardown_timeout = "60s"   # how long a provider's teardown may take
    hook_timeout = "30s"       # how long any other hook the supervisor calls may take
    artifact_policy = "redact" # artifacts holding a declared secret or a detector match: redact | flag | reject
    plugins = ["module", ...]  # extra plugin modules to load

    [redaction.detectors]      # built-in credential detectors, each on by default
    bearer_token = false
    [redaction.patterns]       # extra regexes (group "s" is masked, else the whole match)
    ticket = "TICKET-[0-9]{6}"

    gc_grace = "1h"            # gc keeps unreferenced blobs and temp files younger than this
    events_keep = "7d"         # gc removes event journal segments whose last event is older than this

    [retention]                # per terminal status; how long a run is kept
    succeeded = "14d"
    failed = "7d"
    timed_out = "7d"
    cancelled = "3d"
    [retention.keep_last]      # keep the newest N finished runs of each value of a label
    suite = 5

Unknown keys are kept and ignored, so an older casruns can share a registry with a newer one.
"""

from __future__ import annotations

import os
import stat

from .errors import InvalidInput, RegistryError, UnsupportedFormat
from .fsutil import read_regular
from .manifest import STATUS_TABLE
from .timefmt import parse_duration

FORMAT_FILE = "casruns-registry.toml"
FORMAT_NAME = "casruns-registry"
FORMAT_VERSION = 2  # major: a reader refuses a newer major version
FORMAT_MAX = 64 * 1024  # bytes: the format record is a few lines; anything larger is not ours
CONFIG_MAX = 1 << 20  # bytes of config.toml
PACKS_SINCE = 2  # registries of format 1 hold loose blobs only; `casruns migrate` moves them to 2

DEFAULT_RETENTION = {s: i.default_retention for s, i in STATUS_TABLE.items() if i.default_retention}


class Config:
    """Settings with their defaults. (A plain class: dataclasses costs 8 ms on the status path.)"""

    def __init__(self, raw: dict | None = None) -> None:
        self.max_running: int = os.cpu_count() or 1
        self.kill_grace = 5.0
        self.heartbeat_interval = 1.0
        self.lost_after = 30.0
        self.teardown_timeout = 60.0
        self.hook_timeout = 30.0
        self.artifact_policy = "redact"
        self.gc_grace = 3600.0
        self.events_keep = 7 * 86400.0
        self.keep_last: dict[str, int] = {}
        self.plugins: list[str] = []
        self.retention: dict[str, float] = {k: parse_duration(v) for k, v in DEFAULT_RETENTION.items()}
        self.raw: dict = raw or {}
        self.root: str | None = None  # the registry it was loaded from (retention reads gc's sightings there)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Config":
        path = os.path.join(root, "config.toml")
        try:
            data = read_regular(path, CONFIG_MAX)
        except FileNotFoundError:
            c = cls()
        else:
            import tomllib

            try:
                raw = tomllib.loads(data.decode("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise RegistryError(f"cannot parse {path}: {e}", path=path) from None
            c = cls.from_dict(raw, path)
        c.root = os.fspath(root)
        return c

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "Config":
        c = cls(raw)
        try:
            if "max_running" in raw:
                c.max_running = int(raw["max_running"])
                if c.max_running < 1:
                    raise InvalidInput("max_running must be at least 1")
            for key in ("kill_grace", "heartbeat_interval", "lost_after", "teardown_timeout", "hook_timeout", "gc_grace", "events_keep"):
                if key in raw:
                    setattr(c, key, parse_duration(raw[key]))
            # every table is type-checked here, once: readers then rely on the shapes
            for table in ("redaction", "retention", "archive"):
                if not isinstance(raw.get(table, {}), dict):
                    raise InvalidInput(f"[{table}] must be a table")
            red = raw.get("redaction") or {}
            for sub in ("patterns", "detectors"):
                if not isinstance(red.get(sub, {}), dict):
                    raise InvalidInput(f"[redaction.{sub}] must be a table")
            for name, on in (red.get("detectors") or {}).items():
                if not isinstance(on, bool):
                    raise InvalidInput(f"redaction.detectors.{name} must be true or false")
            if not isinstance((raw.get("retention") or {}).get("keep_last", {}), dict):
                raise InvalidInput("[retention.keep_last] must be a table of label = count")
            for name, pattern in (red.get("patterns") or {}).items():
                if not isinstance(pattern, str):
                    raise InvalidInput(f"redaction.patterns.{name} must be a regular expression string")
                import re

                try:
                    re.compile(pattern.encode())
                except re.error as e:
                    raise InvalidInput(f"redaction.patterns.{name} is not a valid regular expression: {e}") from None
            if c.heartbeat_interval < 0.1:
                raise InvalidInput("heartbeat_interval must be at least 0.1s")
            if c.lost_after <= c.heartbeat_interval:
                raise InvalidInput("lost_after must be longer than heartbeat_interval")
            if "artifact_policy" in raw:
                if raw["artifact_policy"] not in ("redact", "flag", "reject"):
                    raise InvalidInput("artifact_policy must be redact, flag or reject")
                c.artifact_policy = raw["artifact_policy"]
            if "plugins" in raw:
                if not isinstance(raw["plugins"], list) or not all(isinstance(p, str) for p in raw["plugins"]):
                    raise InvalidInput('plugins must be a list of module names, e.g. plugins = ["my_provider"]')
                c.plugins = list(raw["plugins"])
            for status, value in (raw.get("retention") or {}).items():
                if status == "keep_last":
                    continue
                if status not in DEFAULT_RETENTION and status != "default":
                    raise InvalidInput(f"retention.{status}: not a terminal status (succeeded, failed, timed_out, cancelled, default)")
                c.retention[status] = parse_duration(value)
            for label, n in ((raw.get("retention") or {}).get("keep_last") or {}).items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise InvalidInput(f"retention.keep_last.{label} must be a whole number")
                c.keep_last[str(label)] = n
        except (InvalidInput, ValueError, TypeError) as e:
            raise RegistryError(f"invalid setting in {where}: {e}") from None
        return c


def _simple_toml(data: bytes) -> dict | None:
    """Parse ``key = "string"`` / ``key = 123`` lines (the format file's whole shape) without
    importing tomllib on every status poll. Returns None for anything else."""
    out: dict = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.replace("_", "").isalnum():
            return None
        if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1] and "\\" not in value:
            out[key] = value[1:-1]
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            return None
    return out


def packs_for(version: int | None) -> bool:
    """May a registry of this format version (None: not created yet) hold packs? The one rule."""
    return version is None or version >= PACKS_SINCE


def packs_allowed(root: str | os.PathLike) -> bool:
    """Whether the registry's format lets writers store blobs in packs (format 2 and later)."""
    doc = read_format(root)
    return packs_for(None if doc is None else doc["version"])


SAFE_SUBDIRS = ("runs", "blobs", "locks", "slots", "queue", "events", "events/segments", "events/pending")
ALLOW_UNSAFE_ENV = "CASRUNS_ALLOW_UNSAFE_ROOT"


def check_root(root: str | os.PathLike) -> None:
    """Refuse a registry that another user could redirect (as ssh and git's safe.directory do).

    The root must be owned by the invoking user and not writable by group or others; so must
    each of its directories that exists, and none may be a symlink. Otherwise another local user
    who pre-created it, or can write in it, could plant symlinks that make casruns truncate or
    chmod the invoking user's files. ``CASRUNS_ALLOW_UNSAFE_ROOT=1`` opts out (a shared registry
    the user trusts). Costs a few ``lstat`` calls: it runs on the ``status`` path too.
    """
    if os.environ.get(ALLOW_UNSAFE_ENV) == "1":
        return
    from .errors import UnsafeRegistry

    root = os.fspath(root)
    try:
        st = os.stat(root)  # the root itself may be a symlink the user made (~/.local/share/casruns -> /data)
    except OSError:
        return
    me = os.geteuid()
    hint = f"; fix it, or set {ALLOW_UNSAFE_ENV}=1 if you trust everyone who can write there"
    for path, s in [(root, st)] + [(os.path.join(root, d), None) for d in SAFE_SUBDIRS]:
        if s is None:
            try:
                s = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(s.st_mode):
                raise UnsafeRegistry(f"{path} is not a directory (a symlink or a file where the registry keeps a directory){hint}", path=path)
        elif not stat.S_ISDIR(s.st_mode):
            return  # not a directory at all: the caller reports that
        if s.st_uid != me:
            raise UnsafeRegistry(f"{path} is owned by uid {s.st_uid}, not by you (uid {me}){hint}", path=path)
        if s.st_mode & 0o022:
            raise UnsafeRegistry(f"{path} is writable by group or others (mode {stat.S_IMODE(s.st_mode):04o}){hint}", path=path)


def read_format(root: str | os.PathLike) -> dict | None:
    """Return the format record, None if the registry has none yet; refuse newer majors and
    registries another user could redirect (:func:`check_root`)."""
    check_root(root)
    path = os.path.join(root, FORMAT_FILE)
    try:
        data = read_regular(path, FORMAT_MAX)
    except FileNotFoundError:
        # No record: a registry not created yet, unless its directories are there. Answering
        # "no runs" for a registry whose record was lost would make a monitor conclude there
        # are none while runs/ is full of them.
        present = [d for d in ("runs", "blobs") if os.path.lexists(os.path.join(root, d))]
        if present:
            raise RegistryError(
                f"{root} has {' and '.join(d + '/' for d in present)} but no {FORMAT_FILE}: the registry's format "
                f"record is missing; restore it (a registry made by this casruns has format = \"{FORMAT_NAME}\", version = {FORMAT_VERSION})",
                path=path,
            ) from None
        return None
    except RegistryError:
        raise
    except OSError as e:
        raise RegistryError(f"cannot read registry format file {path}: {e.strerror}", path=path) from None
    doc = _simple_toml(data)
    if doc is None:  # not the plain shape we write: let the real parser judge it
        import tomllib

        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"cannot read registry format file {path}: {e}", path=path) from None
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormat(f"{path} does not describe a casruns registry (format = {doc.get('format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UnsupportedFormat(f"{path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"registry {root} has format version {version}, newer than this casruns reads ({FORMAT_VERSION}); upgrade casruns"
        )
    return doc
