"""The run manifest: its fields, its TOML encoding, the statuses and their transition table.

A manifest is a TOML document (schema ``casruns/manifest/v1``, spec/format.md "Manifest").
In memory it is a plain dict, so fields a newer casruns wrote and this one does not know
are kept verbatim when the manifest is rewritten (forward compatibility). TOML has no null:
a ``None`` value means "absent" and is dropped on write.

The file's first line is a comment holding a checksum of the rest of the file
(``# checksum: blake2b-256:<hex>``, spec/format.md "Manifest checksum"). Every read of the TOML
checks it: a manifest that changed after casruns wrote it raises ``manifest_corrupt`` instead of
being obeyed. A manifest without the line (casruns 0.1/0.2, or rewritten by one of them, since
rewrites drop comments) is read unchecked. BLAKE2b comes from the stdlib's ``_blake2``: blake3
or ``hashlib`` (which loads OpenSSL, ~2 ms) would put an import on the ``status`` path.

Beside ``manifest.toml`` a run directory holds ``manifest.json``, a cache of the same dict
tagged with the manifest file's identity (inode, size, mtime) and the checksum of the TOML
bytes it was built from, and carrying a checksum of its own content. ``status`` and ``list``
(:func:`read`) use the cache when its checksum holds and the tag matches, and the TOML
otherwise: parsing TOML costs ~250 us a manifest here, JSON ~10 us, which is what keeps
``list`` of 10,000 runs well under a second. Everything that decides (gc, retention, every
locked update, verify: :func:`read_toml`) reads the TOML bytes and checks them; the cache only
saves it the parse, when it was built from exactly these bytes. A damaged, torn, stale or
missing cache is ignored, and writing one is best-effort (a full disk never fails a read).
"""

from __future__ import annotations

import json
import os

from . import fsutil
from .errors import CasrunsError, CorruptManifest, InvalidTransition, RegistryError, StrayFile, UnsupportedFormat
from .errors import EXIT_OK, EXIT_RUN_CANCELLED, EXIT_RUN_FAILED, EXIT_RUN_TIMED_OUT, EXIT_WAIT_TIMEOUT

SCHEMA = "casruns/manifest/v1"
SCHEMA_PREFIX = "casruns/manifest/v"
SCHEMA_VERSION = 1

QUEUED = "queued"
BOOTING = "booting"
RUNNING = "running"
COLLECTING = "collecting_artifacts"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"



class StatusInfo:
    """What casruns knows about one status (a plain class: dataclasses cost 8 ms on the status path)."""

    __slots__ = ("terminal", "active", "resumable", "exit_code", "default_retention")

    def __init__(self, terminal: bool, active: bool, resumable: bool, exit_code: int, default_retention: str | None) -> None:
        self.terminal, self.active, self.resumable = terminal, active, resumable
        self.exit_code = exit_code  # what `wait` and `run` exit with for a run in this status
        self.default_retention = default_retention  # how long gc keeps it (config [retention] overrides)


# The one status table: every other module reads its facts from here (spec/format.md, "Statuses").
STATUS_TABLE: dict[str, StatusInfo] = {
    QUEUED: StatusInfo(False, False, False, EXIT_WAIT_TIMEOUT, None),
    BOOTING: StatusInfo(False, True, False, EXIT_WAIT_TIMEOUT, None),
    RUNNING: StatusInfo(False, True, False, EXIT_WAIT_TIMEOUT, None),
    COLLECTING: StatusInfo(False, True, False, EXIT_WAIT_TIMEOUT, None),
    SUCCEEDED: StatusInfo(True, False, False, EXIT_OK, "14d"),
    FAILED: StatusInfo(True, False, True, EXIT_RUN_FAILED, "7d"),
    TIMED_OUT: StatusInfo(True, False, True, EXIT_RUN_TIMED_OUT, "7d"),
    CANCELLED: StatusInfo(True, False, True, EXIT_RUN_CANCELLED, "3d"),
}
STATUSES = tuple(STATUS_TABLE)
TERMINAL = frozenset(s for s, i in STATUS_TABLE.items() if i.terminal)
ACTIVE = frozenset(s for s, i in STATUS_TABLE.items() if i.active)
RESUMABLE = frozenset(s for s, i in STATUS_TABLE.items() if i.resumable)


def exit_code_for(status: str) -> int:
    """``wait``/``run``'s exit code for a run in ``status`` (13 while it is still active)."""
    info = STATUS_TABLE.get(status)
    return info.exit_code if info else EXIT_WAIT_TIMEOUT

# The transition table (spec/format.md, "Statuses"). Terminal statuses have no way out.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({BOOTING, FAILED, CANCELLED}),
    BOOTING: frozenset({RUNNING, COLLECTING, FAILED, TIMED_OUT, CANCELLED}),
    RUNNING: frozenset({COLLECTING, FAILED, TIMED_OUT, CANCELLED}),
    COLLECTING: frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    TIMED_OUT: frozenset(),
    CANCELLED: frozenset(),
}

CACHE_SCHEMA = "casruns/manifest-cache/v2"

# A manifest larger than this is refused by readers (manifest_corrupt) and never written; a
# cache larger than CACHE_LIMIT is ignored (JSON escapes non-ASCII text, so it may be larger).
MANIFEST_LIMIT = 4 << 20
CACHE_LIMIT = 4 * MANIFEST_LIMIT

CHECKSUM_ALGORITHM = "blake2b-256"
_CHECKSUM_LINE = b"# checksum: blake2b-256:"  # + 64 lowercase hex digits + LF, the file's first line
_CACHE_HEAD = b'{"schema":"casruns/manifest-cache/v2","checksum":"blake2b-256:'  # + 64 hex + '",' + body
_HEX = frozenset(b"0123456789abcdef")


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def transition(m: dict, new: str, now: str) -> None:
    """Move ``m`` to status ``new``, enforcing the table; stamps started/finished times."""
    old = m.get("status")
    if new not in TRANSITIONS:
        raise InvalidTransition(f"unknown status {new!r}")
    if old == new:
        return
    if old not in TRANSITIONS or new not in TRANSITIONS[old]:
        raise InvalidTransition(
            f"run {m.get('run_id')} cannot go from {old} to {new}", run_id=m.get("run_id"), status=old
        )
    m["status"] = new
    m["updated_at"] = now
    if new == BOOTING and not m.get("started_at"):
        m["started_at"] = now
    if new in TERMINAL:
        m["finished_at"] = now


def _strip_none(value):
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value if v is not None]
    return value


def _digest(data: bytes) -> bytes:
    """BLAKE2b with a 32-byte digest, unkeyed, as lowercase hex (ASCII bytes)."""
    try:
        from _blake2 import blake2b  # what hashlib.blake2b is, without hashlib's OpenSSL import
    except ImportError:  # pragma: no cover - another Python implementation
        from hashlib import blake2b
    return blake2b(data, digest_size=32).hexdigest().encode("ascii")


def checksum(data: bytes) -> str:
    """``blake2b-256:<hex>`` of ``data``: the form manifests and caches record."""
    return f"{CHECKSUM_ALGORITHM}:{_digest(data).decode()}"


def dumps(m: dict) -> bytes:
    """The manifest file's bytes: the checksum line, then the TOML document it covers."""
    import tomli_w  # only writers pay for it

    # Scalars first, tables after: tomli_w requires nothing of the order, but a human
    # reading the file sees run_id and status at the top.
    clean = _strip_none(m)
    ordered = {k: v for k, v in clean.items() if not isinstance(v, dict)}
    ordered.update({k: v for k, v in clean.items() if isinstance(v, dict)})
    body = tomli_w.dumps(ordered).encode("utf-8")
    return _CHECKSUM_LINE + _digest(body) + b"\n" + body


def verify_checksum(data: bytes, where: str = "") -> bool:
    """Check a manifest file's checksum line. True if it holds, False if the file has none
    (written by casruns 0.2 or older); raises CorruptManifest if it does not hold."""
    if not data.startswith(b"#"):
        return False  # no writer that keeps the checksum starts a manifest any other way
    end = data.find(b"\n")
    line = data[:end] if end >= 0 else data
    expected = line[len(_CHECKSUM_LINE) :]
    if not line.startswith(_CHECKSUM_LINE) or len(expected) != 64 or not _HEX.issuperset(expected):
        raise CorruptManifest(
            f"manifest {where} has a damaged checksum line: it changed after casruns wrote it; run casruns verify",
            path=where or None, reason="checksum",
        )
    actual = _digest(data[end + 1 :])
    if actual != expected:
        raise CorruptManifest(
            f"manifest {where} does not match its checksum (recorded {expected.decode()}, content hashes to "
            f"{actual.decode()}): it changed after casruns wrote it, and casruns will not act on it; run casruns verify",
            path=where or None, reason="checksum",
        )
    return True


_TIMESTAMPS = ("created_at", "updated_at", "started_at", "finished_at", "deadline_at", "heartbeat_at", "last_activity_at")
_TABLES = ("labels", "request", "retention", "logs", "artifacts", "runtime", "preview", "error", "cancel", "supervisor", "process")


def structural_problems(m: dict) -> list[str]:
    """What makes a parsed manifest unusable by readers, beyond its schema line: fields of the
    wrong type (a TOML datetime where a timestamp string belongs, a string where a table does),
    malformed timestamps and refs. One list serves local reads, verify and pulls (an archive's
    manifests are checked like local ones before anything of theirs is stored)."""
    problems = []
    for key in ("run_id", "status", "created_at", "updated_at"):
        if not isinstance(m.get(key), str):
            problems.append(f"field {key} is missing or not a string")
    if m.get("status") not in STATUSES:
        problems.append(f"unknown status {m.get('status')!r}")
    for key in _TABLES:
        if key in m and not isinstance(m[key], dict):
            problems.append(f"field {key} is not a table")
    for key, value in (m.get("labels") if isinstance(m.get("labels"), dict) else {}).items():
        if not isinstance(value, str):
            problems.append(f"label {key} is not a string")
    req = m.get("request") if isinstance(m.get("request"), dict) else {}
    for key in ("argv", "env_names", "secret_env", "plugins"):
        if not isinstance(req.get(key, []), list) or not all(isinstance(a, str) for a in req.get(key, [])):
            problems.append(f"request.{key} is not a list of strings")
    for key in ("cwd", "recipe"):
        if req.get(key) is not None and not isinstance(req[key], str):
            problems.append(f"request.{key} is not a string")
    if req.get("timeout") is not None and (isinstance(req["timeout"], bool) or not isinstance(req["timeout"], (int, float)) or req["timeout"] != req["timeout"]):
        problems.append("request.timeout is not a number of seconds")
    ret = m.get("retention") if isinstance(m.get("retention"), dict) else {}
    history = ret.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        problems.append("retention.history is not a list of tables")
    if ret.get("retain_for") is not None and (isinstance(ret["retain_for"], bool) or not isinstance(ret["retain_for"], (int, float)) or ret["retain_for"] != ret["retain_for"]):
        problems.append("retention.retain_for is not a number of seconds")
    for key in ("cancel",):
        for field in ("requested_at",):
            v = (m.get(key) or {}).get(field) if isinstance(m.get(key), dict) else None
            if v is not None and not isinstance(v, str):
                problems.append(f"{key}.{field} is not a timestamp string")
    for stream, ref in (m.get("logs") if isinstance(m.get("logs"), dict) else {}).items():
        if not isinstance(ref, dict) or not _is_address(ref.get("blake3")):
            problems.append(f"logs.{stream} has no blake3 address")
    arts = m.get("artifacts") if isinstance(m.get("artifacts"), dict) else {}
    if "tree" in arts and not _is_address(arts["tree"]):
        problems.append("artifacts.tree is not a blake3 address")
    err = m.get("error")
    if isinstance(err, dict) and not isinstance(err.get("code"), str):
        problems.append("error.code is missing or not a string")
    from .timefmt import parse_ts

    for key in _TIMESTAMPS:
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                problems.append(f"field {key} is not an RFC 3339 timestamp string")
                continue
            try:
                parse_ts(m[key])
            except CasrunsError:
                problems.append(f"field {key} is not an RFC 3339 timestamp")
    for key in ("attempt", "exit_code", "signal"):
        if m.get(key) is not None and (isinstance(m[key], bool) or not isinstance(m[key], int)):
            problems.append(f"field {key} is not an integer")
    return problems


def _is_address(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def jsonable(value, depth: int = 0):
    """A plugin's return value made safe to store and to print as JSON: strings, finite numbers,
    booleans, None, lists and string-keyed tables; datetimes become RFC 3339 strings, NaN and
    infinities and anything else their ``str``. (A ``datetime`` from a plugin used to make every
    later JSON output a traceback.)"""
    import math

    if depth > 32:
        return str(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value if v is not None]
    if hasattr(value, "isoformat"):
        try:
            return value.isoformat()
        except Exception:  # noqa: BLE001 - a plugin's odd object is stored as text
            pass
    return str(value)


def check_schema(m: object, where: str) -> dict:
    if not isinstance(m, dict):
        raise CorruptManifest(f"manifest {where} is not a table")
    schema = m.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            try:
                version = int(schema[len(SCHEMA_PREFIX) :])
            except ValueError:
                version = -1
            if version > SCHEMA_VERSION:
                raise UnsupportedFormat(
                    f"manifest {where} has schema {schema}, newer than this casruns reads ({SCHEMA}); upgrade casruns"
                )
        raise CorruptManifest(f"manifest {where} has unknown schema {schema!r}")
    if m.get("status") not in TRANSITIONS:
        raise CorruptManifest(f"manifest {where} has unknown status {m.get('status')!r}")
    if not isinstance(m.get("run_id"), str):
        raise CorruptManifest(f"manifest {where} has no run_id")
    problems = structural_problems(m)
    if problems:
        raise CorruptManifest(f"manifest {where}: {'; '.join(problems[:3])}")
    return m


def loads(data: bytes, where: str = "") -> dict:
    """Parse a manifest file's bytes, checking its checksum line (if it has one) and schema."""
    return _loads(data, where)[0]


def _loads(data: bytes, where: str) -> tuple[dict, bool]:
    import tomllib  # a reader with a fresh cache never needs it (~7 ms to import)

    try:
        m = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CorruptManifest(f"manifest {where} cannot be parsed: {e}") from None
    # after the parse: damage that breaks the TOML is reported as such (verify: manifest_invalid),
    # damage that leaves it valid is what only the checksum sees (manifest_checksum)
    checked = verify_checksum(data, where)
    return check_schema(m, where), checked


def _read_bytes(path: str) -> tuple[bytes, os.stat_result]:
    """The manifest file's bytes and the fstat of what was read. A FIFO, socket, directory or
    symlink in its place raises StrayFile (never blocks, never follows); one over
    MANIFEST_LIMIT is corrupt (casruns never writes one)."""
    try:
        return fsutil.read_regular_stat(path, MANIFEST_LIMIT)
    except StrayFile:
        raise
    except RegistryError as e:  # over the limit
        raise CorruptManifest(f"manifest {e.message}; casruns never writes one that large", path=path) from None


def read(path: str) -> dict:
    """Read a manifest for display (``status``, ``list``): the cache when its own checksum holds
    and its tag matches a fresh ``lstat`` of the TOML, else the TOML (checked), then the cache is
    rebuilt best-effort. Only what nothing decides on may come from here (spec/format.md,
    "What each reader trusts")."""
    st = os.lstat(path)  # FileNotFoundError: no run. lstat: a symlink never matches a tag.
    doc = _read_cache(path)
    if doc is not None and doc["tag"] == _tag(st):
        return doc["manifest"]
    data, fst = _read_bytes(path)
    m = loads(data, path)
    _store_cache(path, m, fst, data)
    return m


def read_toml(path: str, *, cache: bool = True) -> dict:
    """Read a manifest to act on it: always the TOML file's bytes, checksum checked.

    The parsed form may come from the cache, but only when the cache's own checksum holds and it
    records exactly the checksum of the bytes just read: it was built from this very content
    (which was checked when it was), so it saves the TOML parse and nothing else. ``cache=False``
    (verify) parses the TOML and writes nothing.
    """
    return read_toml_checked(path, cache=cache)[0]


def read_toml_checked(path: str, *, cache: bool = True) -> tuple[dict, bool | None]:
    """:func:`read_toml`, and whether the file carries a checksum (True: checked, False: a
    manifest from casruns 0.2 or older, unchecked, None: it came via the cache, so not known)."""
    data, fst = _read_bytes(path)
    if cache:
        doc = _read_cache(path)
        if doc is not None and doc["toml"] == checksum(data):
            return doc["manifest"], None
    m, checked = _loads(data, path)
    if cache:
        _store_cache(path, m, fst, data)
    return m, checked


def _tag(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _cache_path(path: str) -> str:
    return path[: -len(".toml")] + ".json" if path.endswith(".toml") else path + ".json"


def _read_cache(path: str) -> dict | None:
    """The cache document if it is intact (its checksum holds) and well-formed, else None."""
    try:
        data = fsutil.read_regular(_cache_path(path), CACHE_LIMIT)
    except (OSError, CasrunsError):  # missing, a stray, too large: as good as absent
        return None
    return parse_cache(data)


def parse_cache(data: bytes) -> dict | None:
    """A ``manifest.json`` document, or None unless its checksum covers exactly its body."""
    n = len(_CACHE_HEAD)
    if not data.startswith(_CACHE_HEAD) or data[n + 64 : n + 66] != b'",' or _digest(data[n + 66 :]) != data[n : n + 64]:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    m = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(doc.get("tag"), list) or not isinstance(doc.get("toml"), str):
        return None
    # a cache that is not intact is never an error, only not used: its manifest must pass the
    # same checks as the TOML's (a crafted one could hold anything a reader would choke on)
    try:
        check_schema(m, "(cache)")
    except CasrunsError:
        return None
    return doc


def write(path: str, m: dict, *, dirs: fsutil.DirSync | None = None) -> None:
    """Write the manifest durably (temp, fsync, rename, fsync dir), then refresh its cache."""
    check_schema(m, path)
    data = dumps(m)
    if len(data) > MANIFEST_LIMIT:
        raise RegistryError(f"manifest {path} would be {len(data)} bytes, over the limit of {MANIFEST_LIMIT}; not written", path=path)
    fsutil.atomic_write(path, data, dirs=dirs)
    write_cache(path, m, data)


def write_cache(path: str, m: dict, data: bytes) -> None:
    """Cache ``m``, which was just written to ``path`` as ``data``. The cache is rebuilt from the
    manifest by the next reader if lost, so it needs no fsync; any failure only costs speed."""
    try:
        st = os.stat(path)
    except OSError:
        return
    _store_cache(path, m, st, data)


def _store_cache(path: str, m: dict, st: os.stat_result, toml: bytes) -> None:
    """Best-effort: a cache that cannot be written (full disk, read-only registry, a stray in
    its place) is only a slower read next time, never an error."""
    try:
        body = json.dumps({"tag": _tag(st), "toml": checksum(toml), "manifest": _strip_none(m)}, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        body = None  # a value JSON cannot hold (a TOML datetime a newer writer used)
    if body is None or len(body) + len(_CACHE_HEAD) + 66 > CACHE_LIMIT:
        # no cache, and no stale one either, so readers parse the TOML.
        try:
            os.unlink(_cache_path(path))
        except OSError:
            pass
        return
    rest = body[1:]  # the object's members after its opening brace
    try:
        fsutil.atomic_write(_cache_path(path), _CACHE_HEAD + _digest(rest) + b'",' + rest, durable=False)
    except (OSError, CasrunsError):
        pass
