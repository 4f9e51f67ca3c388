"""The archive's index: run summaries, so that ``archive list`` of 100,000 runs costs a handful of
requests instead of one GET per manifest (issue 18; spec/format.md, "Archives", and
spec/archive-gc.md).

The index is a set of segment objects under ``index/``::

    index/<machine>-<16 hex time_ns>-<8 hex nonce>.ndjson

Each line of a segment is one entry (:func:`entry`)::

    {"schema": "casruns/archive-index/v1", "run_id": ..., "version": ..., "summary": {...}, "blobs": [...]}

``version`` is the archived manifest object's version (``Remote.stat(key).version``: S3's ETag, a
file's inode/mtime/size) right after the push wrote it. A reader uses an entry only while the
``runs/`` listing shows that same version for ``runs/<id>/manifest.toml`` (:meth:`Index.summary`);
any other case (no entry, an older one, a manifest another machine rewrote) reads the manifest
as before, and an entry whose manifest is gone is ignored. So the index is only ever a cache:
losing a segment, or a corrupt line in one, costs requests, never a wrong answer.

Who calls what:

- **push** (casruns/archive.py), after it wrote a run's manifest: ``remote.stat(manifest_key)``
  for the version, then ``entry(...)`` per run, then one :func:`append` per push (one segment
  per push, not per run).
- **archive gc**, after it decided which runs are current: :func:`load`, keep the entries whose
  version matches its manifest listing, and :func:`compact` them into one segment.
- **archive list**: :func:`load` with ``blobs=False`` (casruns/archive.py ``list_archive``).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import TYPE_CHECKING

from .errors import ArchiveUnavailable, CasrunsError
from .ids import is_run_id

if TYPE_CHECKING:
    from .config import Config
    from .remotes import Remote

SCHEMA = "casruns/archive-index/v1"
PREFIX = "index"
SEGMENT_MAX = 1 << 30  # bytes read of one segment at most (a compacted 10^6-run index is ~10^9)
LINE_MAX = 16 << 20  # bytes of one entry at most (a run with ~200,000 files)
CHUNK = 1 << 20
SUMMARY_KEYS = ("status", "promoted", "created_at", "labels", "origin", "event_seq", "incarnation")
_MACHINE = re.compile(r"[^A-Za-z0-9._-]")
_SEGMENT = re.compile(r"^index/(?P<machine>[A-Za-z0-9._-]{1,64})-(?P<seq>[0-9a-f]{16})-(?P<nonce>[0-9a-f]{8})\.ndjson$")
_ADDRESS = re.compile(r"^[0-9a-f]{64}$")


def summary(m: dict, config: "Config") -> dict:
    """What ``archive list`` shows of a run (and filters on), from its manifest: built like the
    run record (``record.build``), so an indexed row and a read one are the same bytes."""
    from .record import build

    r = build(m, config)
    return {"status": m["status"], "promoted": r["retention"]["promoted"], "created_at": m.get("created_at"),
            "labels": r["labels"], "origin": r["origin"], "event_seq": r["event_seq"], "incarnation": r["incarnation"]}


def entry(run_id: str, version: str, m: dict, blobs: list[str], config: "Config") -> dict:
    """One index line for a run push just archived.

    ``version``: the version of ``runs/<run_id>/manifest.toml`` as the store reports it right
    after this push wrote (or found) it: ``remote.stat(archive.manifest_key(run_id)).version``.
    ``m``: that manifest; ``blobs``: every blob address it references (its logs, its tree and the
    tree's files: ``archive._run_blobs``), which archive gc marks from without reading the tree.
    """
    if m.get("run_id") != run_id or not is_run_id(run_id):
        raise ValueError(f"index entry: manifest of {m.get('run_id')!r} given for run {run_id!r}")
    return {"schema": SCHEMA, "run_id": run_id, "version": str(version), "summary": summary(m, config),
            "blobs": list(dict.fromkeys(blobs)), "retention": retention_fields(m)}


def retention_fields(m: dict) -> dict:
    """What archive gc's retention rules read of a manifest besides the summary: its times, its
    own retention fields and when it was last promoted (casruns/archivegc.py, ``_expired``)."""
    ret = m.get("retention") or {}
    last = next((h for h in reversed(ret.get("history") or []) if isinstance(h, dict) and h.get("action") == "promote"), None)
    return {"finished_at": m.get("finished_at"), "updated_at": m.get("updated_at"), "retain_until": ret.get("retain_until"),
            "retain_for": ret.get("retain_for"), "promoted_at": last.get("at") if last else None}


def as_manifest(e: dict) -> dict | None:
    """The fields of a manifest that archive gc's retention rules read, rebuilt from an entry;
    None for an entry written without them (gc then reads the manifest)."""
    r = e.get("retention")
    if not isinstance(r, dict):
        return None
    s = e["summary"]
    history = [{"action": "promote", "at": r["promoted_at"]}] if r.get("promoted_at") else []
    return {"run_id": e["run_id"], "status": s["status"], "created_at": s["created_at"], "labels": s["labels"], "origin": s["origin"],
            "finished_at": r.get("finished_at"), "updated_at": r.get("updated_at"),
            "retention": {"promoted": s["promoted"], "history": history, "retain_until": r.get("retain_until"),
                          "retain_for": r.get("retain_for")}}


def machine_name(name: str) -> str:
    """``name`` made fit for a segment key (letters, digits, ``.``, ``_``, ``-``; at most 64)."""
    return (_MACHINE.sub("_", name) or "unknown")[:64]


def segment_key(machine: str) -> str:
    """A new segment's key: the writer's name, its clock (only to order a reader's ties; never
    compared for correctness) and a nonce, so two writers never pick the same key."""
    return f"{PREFIX}/{machine_name(machine)}-{time.time_ns():016x}-{secrets.token_hex(4)}.ndjson"


def is_segment(key: str) -> bool:
    return _SEGMENT.match(key) is not None


def _encode(entries: list[dict]) -> bytes:
    lines = []
    for e in entries:
        problem = _invalid(e)
        if problem:
            raise ValueError(f"index entry for {e.get('run_id')!r}: {problem}")
        lines.append(json.dumps(e, separators=(",", ":"), sort_keys=True, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def append(remote: "Remote", machine: str, entries: list[dict]) -> str | None:
    """Write ``entries`` as one new segment; its key, or None (and no request) for no entries.

    Push calls it once, after the manifests of every run it pushed are written (an entry must
    never name a manifest version that is not in the archive yet; one that is older than the
    archive's is harmless: readers skip it). A failed append loses nothing but speed."""
    if not entries:
        return None
    key = segment_key(machine)
    remote.put_bytes(_encode(entries), key)
    return key


def _invalid(e) -> str | None:
    """Why ``e`` is not an index entry this version can use (None: it is one)."""
    if not isinstance(e, dict) or e.get("schema") != SCHEMA:
        return "not a casruns/archive-index/v1 entry"
    if not isinstance(e.get("run_id"), str) or not is_run_id(e["run_id"]):
        return "no valid run_id"
    if not isinstance(e.get("version"), str) or not e["version"]:
        return "no version"
    s = e.get("summary")
    if not isinstance(s, dict) or any(k not in s for k in SUMMARY_KEYS):
        return "an incomplete summary"
    if not isinstance(s["status"], str) or not isinstance(s["promoted"], bool) or not isinstance(s["labels"], dict):
        return "a summary of the wrong types"
    if not (s["created_at"] is None or isinstance(s["created_at"], str)) or not (s["origin"] is None or isinstance(s["origin"], dict)):
        return "a summary of the wrong types"
    if not isinstance(s["event_seq"], int) or isinstance(s["event_seq"], bool) or not isinstance(s["incarnation"], str):
        return "a summary of the wrong types"
    blobs = e.get("blobs")
    if not isinstance(blobs, list) or not all(isinstance(a, str) and _ADDRESS.match(a) for a in blobs):
        return "a blob list that is not a list of addresses"
    return None


class Index:
    """What :func:`load` read: per run, the entry of the newest segment that carries it, and per
    (run, manifest version) the newest such entry; the segment keys read (for compaction);
    the problems met (corrupt lines or segments: skipped, reported here, never fatal)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}  # run_id -> the newest segment's entry
        self.segments: list[str] = []  # every segment key listed and read (or found corrupt), oldest first
        self.problems: list[dict] = []  # {"segment", "line"?, "message"}
        self._by_version: dict[tuple[str, str], dict] = {}

    def add(self, e: dict) -> None:
        """Later calls win: :func:`load` adds segments oldest first, lines in order."""
        self.entries[e["run_id"]] = e
        self._by_version[(e["run_id"], e["version"])] = e

    def entry(self, run_id: str, version: str | None) -> dict | None:
        """The entry for ``run_id`` written for exactly this manifest ``version`` (as the
        ``runs/`` listing shows it now), else None: the caller reads the manifest."""
        if version is None:
            return None
        return self._by_version.get((run_id, version))

    def summary(self, run_id: str, version: str | None) -> dict | None:
        e = self.entry(run_id, version)
        return e["summary"] if e is not None else None

    def __len__(self) -> int:
        return len(self.entries)


def _order(o) -> tuple:
    """Segments oldest first: by the store's time (one clock), then the writer's clock, then key."""
    m = _SEGMENT.match(o.key)
    return (o.mtime, m["seq"] if m else "", o.key)


def load(remote: "Remote", *, blobs: bool = True) -> Index:
    """The archive's index: one listing of ``index/`` and one GET per segment.

    A segment over SEGMENT_MAX, one that vanished between the listing and its GET (a gc
    compacted it: its entries are in the newer segment, or the runs' manifests are read), or
    a line that is not a valid entry is skipped and recorded in ``Index.problems``.
    ``blobs=False`` drops the blob lists (``archive list`` needs only summaries)."""
    index = Index()
    listing = sorted((o for o in remote.objects(PREFIX) if is_segment(o.key)), key=_order)
    for o in listing:
        index.segments.append(o.key)  # a corrupt one too: compaction folds (drops) it like the rest
        if o.size > SEGMENT_MAX:
            index.problems.append({"segment": o.key, "message": f"larger than {SEGMENT_MAX} bytes; skipped"})
            continue
        try:
            for n, line in _lines(remote, o.key, index):  # streamed: one line held at a time
                _add_line(index, o.key, n, line, blobs)
        except ArchiveUnavailable:
            raise  # the store failed: not a problem of the index
        except CasrunsError as e:  # gone (compacted meanwhile), a stray, too large: its lines read so far stay
            index.problems.append({"segment": o.key, "message": e.message})
    return index


def _add_line(index: Index, key: str, n: int, line: bytes, blobs: bool) -> None:
    try:
        e = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        index.problems.append({"segment": key, "line": n, "message": f"not JSON: {err}"})
        return
    problem = _invalid(e)
    if problem:
        index.problems.append({"segment": key, "line": n, "message": problem})
        return
    if not blobs:
        e["blobs"] = []
    index.add(e)


def _lines(remote: "Remote", key: str, index: Index):
    """(line number, bytes) of one segment, streamed: a segment is never held whole, a line of
    more than LINE_MAX bytes is skipped (and reported), the read stops at SEGMENT_MAX bytes."""
    from .errors import TooLarge

    n, pending, total, skipping = 0, bytearray(), 0, False
    with remote.open(key) as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
            if total > SEGMENT_MAX:
                raise TooLarge(f"{key} grew over {SEGMENT_MAX} bytes while it was read")
            *done, rest = chunk.split(b"\n")
            for part in done:
                n += 1
                if skipping:
                    skipping = False
                else:
                    pending += part
                    if len(pending) <= LINE_MAX:
                        yield n, bytes(pending)
                    else:
                        index.problems.append({"segment": key, "line": n, "message": f"longer than {LINE_MAX} bytes"})
                pending.clear()
            if not skipping:
                pending += rest
                if len(pending) > LINE_MAX:
                    index.problems.append({"segment": key, "line": n + 1, "message": f"longer than {LINE_MAX} bytes"})
                    pending.clear()
                    skipping = True
    if pending and not skipping:
        yield n + 1, bytes(pending)  # a last line without its newline (a truncated copy, say)


def compact(remote: "Remote", machine: str, live: dict[str, dict], folded: list[str] | None = None) -> dict:
    """Replace the index with ONE segment holding ``live`` (run_id -> entry: what archive gc
    decided is current, normally the loaded entries whose ``version`` matches the manifest
    listing), then delete the segments it replaces.

    Only segments that existed before the new one was written are deleted: ``folded`` (the
    ``Index.segments`` of the :func:`load` that ``live`` came from) when given, else those the
    listing just before the write showed. A segment a push appends meanwhile is not among them
    and survives. Without ``folded`` a segment written between gc's load and this listing is
    deleted unread: that loses speed (its runs' manifests are read again), never correctness.

    Returns ``{"segment", "entries", "segments_deleted"}``."""
    if folded is None:
        folded = [o.key for o in remote.objects(PREFIX) if is_segment(o.key)]
    entries = [live[rid] for rid in sorted(live)]
    key = append(remote, machine, entries)
    old = [k for k in dict.fromkeys(folded) if k != key and is_segment(k)]
    remote.delete(old)
    return {"segment": key, "entries": len(entries), "segments_deleted": len(old)}
