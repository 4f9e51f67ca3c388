"""The run manifest: its fields, its TOML encoding, the statuses and their transition table.

A manifest is a TOML document (schema ``casruns/manifest/v1``, spec/format.md "Manifest").
In memory it is a plain dict, so fields a newer casruns wrote and this one does not know
are kept verbatim when the manifest is rewritten (forward compatibility). TOML has no null:
a ``None`` value means "absent" and is dropped on write.

Beside ``manifest.toml`` a run directory holds ``manifest.json``, a cache of the same dict
tagged with the manifest file's identity (inode, size, mtime). ``status`` and ``list`` read
the cache when the tag matches and the TOML otherwise: parsing TOML costs ~250 us a
manifest here, JSON ~10 us, which is what keeps ``list`` of 10,000 runs well under a second.
The cache is never trusted over the TOML: a mismatched, torn or missing cache is ignored.
"""

from __future__ import annotations

import json
import os

from . import fsutil
from .errors import CorruptManifest, InvalidTransition, UnsupportedFormat

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

STATUSES = (QUEUED, BOOTING, RUNNING, COLLECTING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED})
ACTIVE = frozenset({BOOTING, RUNNING, COLLECTING})

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

CACHE_SCHEMA = "casruns/manifest-cache/v1"


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


def dumps(m: dict) -> bytes:
    import tomli_w  # only writers pay for it

    # Scalars first, tables after: tomli_w requires nothing of the order, but a human
    # reading the file sees run_id and status at the top.
    clean = _strip_none(m)
    ordered = {k: v for k, v in clean.items() if not isinstance(v, dict)}
    ordered.update({k: v for k, v in clean.items() if isinstance(v, dict)})
    return tomli_w.dumps(ordered).encode("utf-8")


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
    return m


def loads(data: bytes, where: str = "") -> dict:
    import tomllib  # a reader with a fresh cache never needs it (~7 ms to import)

    try:
        m = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CorruptManifest(f"manifest {where} cannot be parsed: {e}") from None
    return check_schema(m, where)


def read(path: str) -> dict:
    """Read a manifest from ``path`` (the TOML file), preferring a matching JSON cache."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    cache = _read_cache(path, st)
    if cache is not None:
        return cache
    with open(path, "rb") as f:
        data = f.read()
        fst = os.fstat(f.fileno())
    m = loads(data, path)
    # Rebuild a missing or stale cache, tagged with the file we actually read.
    try:
        _store_cache(path, m, fst)
    except OSError:
        pass  # read-only registry: stay correct, only slower
    return m


def read_toml(path: str) -> dict:
    with open(path, "rb") as f:
        return loads(f.read(), path)


def _tag(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _cache_path(path: str) -> str:
    return path[: -len(".toml")] + ".json" if path.endswith(".toml") else path + ".json"


def _read_cache(path: str, st: os.stat_result) -> dict | None:
    try:
        with open(_cache_path(path), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA or doc.get("tag") != _tag(st):
        return None
    m = doc.get("manifest")
    return m if isinstance(m, dict) and m.get("schema") == SCHEMA else None


def write(path: str, m: dict, *, dirs: fsutil.DirSync | None = None) -> None:
    """Write the manifest durably (temp, fsync, rename, fsync dir), then refresh its cache."""
    check_schema(m, path)
    fsutil.atomic_write(path, dumps(m), dirs=dirs)
    write_cache(path, m)


def write_cache(path: str, m: dict) -> None:
    """The cache is rebuilt from the manifest by the next reader if lost, so it needs no fsync."""
    try:
        _store_cache(path, m, os.stat(path))
    except OSError:
        pass  # a cache that cannot be written is only a slower read


def _store_cache(path: str, m: dict, st: os.stat_result) -> None:
    try:
        data = json.dumps({"schema": CACHE_SCHEMA, "tag": _tag(st), "manifest": _strip_none(m)}, separators=(",", ":"))
    except (TypeError, ValueError):
        # a value JSON cannot hold (a TOML datetime a newer writer used): no cache, and no
        # stale one either, so readers parse the TOML.
        try:
            os.unlink(_cache_path(path))
        except OSError:
            pass
        return
    fsutil.atomic_write(_cache_path(path), data.encode(), durable=False)
