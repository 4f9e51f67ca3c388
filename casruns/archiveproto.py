"""The fleet archive's shared-state protocol between pushers and gc (spec/archive-gc.md).

An archive is written by many machines at once and has no server of ours and no atomic rename,
so pushers and the archive's gc coordinate through objects in the archive itself:

* a push holds a **lease** (``pushes/<machine>-<nonce>.lease``), rewritten twice every ``lease``
  period while it runs and removed at its end;
* gc's **marks** (``gc/marks/<gc-id>.json``) list the blobs no manifest referenced when the mark
  was written; the mark's own LastModified is its time ``T0``;
* while gc deletes it holds a **sweep** object (``gc/sweeping/<gc-id>``), rewritten like a lease.

A push touches (writes again) every present blob an open mark lists, so the blob's LastModified
passes ``T0`` and the sweep spares it; a push that touched waits out a sweep in progress before
it writes a manifest that relies on those blobs. Times compared are always the store's own
(:func:`store_now`); a machine's clock only measures its own intervals (``time.monotonic``).

The manifest of a run pushed by two machines is merged, never overwritten blindly
(:func:`publish_manifest`): promotion history is the union, and the newer record wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from .errors import ArchiveUnavailable, CasrunsError, CorruptManifest, RegistryError

LEASES = "pushes"
MARKS = "gc/marks"
SWEEPS = "gc/sweeping"
NOW = "gc/now"
LOCK = "gc/lock"
RECORDS = "gc/records"
DOC_LIMIT = 64 << 20  # bytes: a mark lists up to ~10^6 candidates (67 bytes each)

STALE_AFTER = 3  # ... and one unchanged for this many periods is stale (its writer is gone)


def machine_of(registry) -> dict:
    """Who writes: this registry's stable id and host name (the runs' ``origin``). A read-only
    registry made before registry ids existed cannot get one (``archive push`` serves read-only
    registries): it is named by a digest of its path instead, stable for that mount."""
    from .errors import RegistryError

    try:
        rid = registry.registry_id
    except (RegistryError, OSError):
        import hashlib

        rid = hashlib.blake2b(os.path.realpath(registry.root).encode(), digest_size=8).hexdigest()
    return {"registry_id": rid, "host": socket.gethostname()}


def printable(text: object, limit: int = 64) -> str:
    """A string read from the archive, fit for a one-line message (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))[:limit]


def machine_key(machine: dict) -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in (machine.get("host") or "host"))[:64]
    return f"{host}-{machine['registry_id']}"


def nonce() -> str:
    return os.urandom(4).hex()


def store_now(remote, name: str) -> float:
    """The store's "now": write a probe object and read its LastModified back, then remove it.
    Two requests; the only way to ask the store's clock, which is the one every time gc
    compares was written by."""
    key = f"{NOW}/{name}"
    remote.put_bytes(b"", key)
    try:
        got = remote.stat(key)
        if got is None:
            raise ArchiveUnavailable(f"{remote.url}: the probe object {key} vanished after it was written")
        return got.mtime
    finally:
        remote.delete([key])


def read_json(remote, key: str, limit: int = DOC_LIMIT) -> dict | None:
    """A JSON document of ours in the archive; None if it is gone or does not parse (a torn
    object cannot exist on S3, but a hand-edited one can)."""
    from .errors import RunNotFound

    try:
        doc = json.loads(remote.get_bytes(key, limit=limit))
    except (RunNotFound, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def declared_period(doc: dict | None) -> float:
    """The rewrite period an object of ours says its writer uses (0 when it says none)."""
    p = (doc or {}).get("period")
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0 else 0.0


def stale_after(remote, key: str, period: float, age: float) -> bool:
    """Whether an object last rewritten ``age`` seconds ago (store time) is stale: older than
    STALE_AFTER periods, by the longer of ``period`` (the current setting) and the one its
    writer declared in it (read only when the first test says stale)."""
    if age < STALE_AFTER * period:
        return False
    return age >= STALE_AFTER * max(period, declared_period(read_json(remote, key, limit=1 << 16)))


class Refresher:
    """An object rewritten every ``period / 2`` seconds on a thread while its holder works: a
    push's lease, the gc lock, a sweep object. ``healthy()`` says whether the last rewrite that
    succeeded is recent enough (by this machine's monotonic clock) that nobody can have judged
    the object stale; a holder that is not healthy must re-check before it relies on it."""

    def __init__(self, remote, key: str, doc: dict, period: float, *, version_guard: bool = False) -> None:
        # the period goes into the object: whoever judges it stale uses the longer of this and
        # the archive's current setting, so a shorter `gc.lease` set meanwhile cannot make a
        # live holder look dead
        self.remote, self.key, self.doc, self.period = remote, key, {**doc, "period": period}, period
        self.version_guard = version_guard  # the gc lock: rewrite only our own version (put_if)
        self.version: str | None = None
        self.lost = False
        self.n = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_ok = 0.0
        self.last_sent: float | None = None  # when the last successful write was sent (monotonic)
        self.max_gap = 0.0  # the longest gap between successful writes since the epoch (renew resets it)

    def _write(self) -> None:
        sent = time.monotonic()
        self.n += 1
        data = dump({**self.doc, "n": self.n})
        if self.version_guard and self.version is not None:
            version = self.remote.put_if(data, self.key, self.version)
            if version is None:
                self.lost = True  # another gc judged us stale and took the lock
                return
            self.version = version
        else:
            self.remote.put_bytes(data, self.key)
        done = time.monotonic()
        if self.last_sent is not None:
            # the store saw this write at most done - last_sent after the previous one: the
            # longest such gap is how close the object came to looking stale
            self.max_gap = max(self.max_gap, done - self.last_sent)
        self.last_sent, self.last_ok = sent, done

    def start(self, *, written: bool = False) -> "Refresher":
        if written:  # the caller wrote it (and set self.version from that write)
            self.last_ok = self.last_sent = time.monotonic()
        else:
            self._write()
        self._thread = threading.Thread(target=self._loop, name=f"casruns-refresh-{self.key}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # twice a period: a gap between rewrites is then half a period plus two write latencies,
        # well inside the safe gap even for a 1 s lease on a slow store
        while not self._stop.wait(self.period / 2):
            if self.lost:
                return
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a failed rewrite shows as not healthy(); the next one may succeed
                pass

    def safe_gap(self) -> float:
        """The longest gap between writes that nobody can have judged stale: STALE_AFTER periods,
        less a second (S3's LastModified has one-second steps) and half a period of margin."""
        return STALE_AFTER * self.period - 1.0 - self.period / 2

    def healthy(self) -> bool:
        """No gap since the epoch, and none now, long enough for anyone to have judged this
        object stale. A holder that is not healthy renews and looks again at what it relied on."""
        if self.lost or self.last_sent is None:
            return False
        return self.max_gap < self.safe_gap() and time.monotonic() - self.last_sent < self.safe_gap()

    def renew(self) -> None:
        """Write now and start a new epoch (raises if the store refuses: the holder then stops)."""
        self._write()
        self.max_gap = 0.0

    def stop(self, *, remove: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if remove and not self.lost:
            try:
                if self.version_guard and self.version is not None:
                    self.remote.delete_if(self.key, self.version)
                else:
                    self.remote.delete([self.key])
            except CasrunsError:
                pass  # left behind: stale after STALE_AFTER periods, removed by the next gc


class Marks:
    """What a pusher must know of gc's open marks: which blobs they list, and whether a sweep is
    deleting some of them right now. Read once after the lease is written (the order is what
    makes the protocol safe: spec/archive-gc.md, race 4)."""

    def __init__(self, remote) -> None:
        self.remote = remote
        self.candidates: dict[str, set[str]] = {}  # gc id -> the blobs its mark lists
        for o in remote.objects(MARKS):
            if not o.key.endswith(".json"):
                continue
            doc = read_json(remote, o.key)
            gc_id = o.key.rsplit("/", 1)[-1][: -len(".json")]
            listed = (doc or {}).get("candidates")
            if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
                # unreadable or malformed: it counts as listing everything (touch every present
                # blob) rather than nothing
                self.candidates[gc_id] = _Everything()
                continue
            self.candidates[gc_id] = set(listed)

    def marked(self, address: str) -> list[str]:
        return [g for g, c in self.candidates.items() if address in c]

    def wait_for_sweeps(self, gc_ids: set[str], period: float, *, dead: dict | None = None, sleep=time.sleep) -> float:
        """Wait while a sweep of one of these marks is in progress (its object present and being
        rewritten); a sweep object unchanged for STALE_AFTER periods of this machine's monotonic
        clock belongs to a dead gc, which deletes nothing more. Returns the seconds waited."""
        waited = 0.0
        dead = {} if dead is None else dead  # sweep key -> the version judged dead (kept across calls)
        seen: dict[str, tuple[str, float, float]] = {}  # gc id -> (version, first seen, period)
        while True:
            live = False
            for o in self.remote.objects(SWEEPS):
                gc_id = o.key.rsplit("/", 1)[-1]
                if gc_id not in gc_ids or dead.get(o.key) == o.version:
                    continue
                first = seen.get(gc_id)
                if first is None or first[0] != o.version:
                    declared = declared_period(read_json(self.remote, o.key, limit=1 << 16))
                    seen[gc_id] = (o.version, time.monotonic(), max(period, declared))
                    live = True
                elif time.monotonic() - first[1] < STALE_AFTER * first[2]:
                    live = True
                else:
                    dead[o.key] = o.version  # its gc is gone: it deletes nothing more; never wait on it again
            if not live:
                return waited  # > 0: a sweep ended (or was judged dead) meanwhile: look again
            step = min(1.0, period / 2)
            sleep(step)
            waited += step


class _Everything(set):
    def __contains__(self, item) -> bool:  # noqa: D401 - an unreadable mark: every blob counts as listed
        return True


# ---- one run's manifest, written by several machines -------------------------------------


def merge(ours: dict, theirs: dict | None) -> dict:
    """The manifest to publish when the archive already holds ``theirs`` for the same run:
    promotion history is the union of both (keyed by ``at``, ``action``, ``by``), ``promoted``
    follows the newest entry, and the newer record (higher ``event_seq``, then ``updated_at``)
    decides every other field. A promotion made on either machine is never lost."""
    if theirs is None or theirs.get("run_id") != ours.get("run_id"):
        return ours

    def rank(m: dict) -> tuple:
        return (int(m.get("event_seq") or 0), str(m.get("updated_at") or ""))

    newer, older = (theirs, ours) if rank(theirs) > rank(ours) else (ours, theirs)
    out = dict(newer)
    # retention is merged field by field: ``event_seq`` counts one registry's changes (a pulled
    # copy starts again), so neither record's retention may simply win over the other's
    a, b = newer.get("retention") or {}, older.get("retention") or {}
    ret = dict(a)
    hist: dict[tuple, dict] = {}
    for h in (b.get("history") or []) + (a.get("history") or []):
        if isinstance(h, dict):
            hist.setdefault((str(h.get("at")), str(h.get("action")), str(h.get("by"))), h)
    if hist:
        entries = sorted(hist.values(), key=lambda h: str(h.get("at") or ""))
        ret["history"] = entries
        last = entries[-1].get("action")
        if last in ("promote", "unpromote"):
            ret["promoted"] = last == "promote"
    # kept as long as either machine asked (an archive only ever keeps a run longer)
    untils = [r["retain_until"] for r in (a, b) if r.get("retain_until")]
    if untils:
        ret["retain_until"] = max(untils)
    fors = [r["retain_for"] for r in (a, b) if isinstance(r.get("retain_for"), (int, float)) and not isinstance(r.get("retain_for"), bool)]
    if fors:
        ret["retain_for"] = max(fors)
    if ret or "retention" in out:
        out["retention"] = ret
    stamps = [m["updated_at"] for m in (newer, older) if isinstance(m, dict) and isinstance(m.get("updated_at"), str)]
    if stamps:
        out["updated_at"] = max(stamps)
    return out


def publish_manifest(remote, key: str, data: bytes, m: dict, *, attempts: int = 20) -> tuple[str | None, dict, str | None]:
    """Write one run's manifest, merged with what the archive holds (:func:`merge`), replacing
    only the version it read (If-Match; If-None-Match for a new run) and retrying on a conflict.
    On a store without conditional writes it writes and reads back, and merges again if another
    push replaced it in between. Returns (None: the archive's copy already says it all,
    "written": ours as it is, or "merged": ours merged with another machine's; the manifest the
    archive now holds; its version as far as known, for the index)."""
    from . import manifest as mf

    for _ in range(attempts):
        current = remote.stat(key)
        theirs = None
        if current is not None:
            raw = remote.get_bytes(key, limit=mf.MANIFEST_LIMIT)
            if raw == data:
                return None, m, current.version
            try:
                theirs = mf.loads(raw, f"{remote.url}/{key}")
            except (CorruptManifest, RegistryError):
                theirs = None  # an unreadable archived copy is replaced by ours
        merged = merge(m, theirs)
        if theirs is not None and merged == theirs:
            return None, theirs, current.version  # the archive's copy already says everything ours does
        body, outcome = (data, "written") if merged == m else (mf.dumps(merged), "merged")
        if remote.conditional:
            version = remote.put_if(body, key, current.version if current else None)
            if version is not None:
                return outcome, merged, version  # the version this write made: the index names no other
            continue  # another push replaced it meanwhile: merge with that one
        remote.put_bytes(body, key)
        back = remote.get_bytes(key, limit=mf.MANIFEST_LIMIT)
        if back == body:
            return outcome, merged, _version_of(remote, key)
    raise ArchiveUnavailable(f"{remote.url}: {key} kept changing under {attempts} merges; another push is writing it in a loop")


def _version_of(remote, key: str) -> str | None:
    got = remote.stat(key)
    return got.version if got else None
