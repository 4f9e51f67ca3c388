"""Mark-and-sweep garbage collection that never loses a referenced or promoted blob.

Phases (spec/format.md, "Garbage collection"), under ``locks/gc.lock`` held exclusively for
the whole run (a second gc waits with ``wait=True`` or fails with ``busy``):

0. **Finish** deletions a killed gc left: ``runs/.trash-*`` directories.
1. **Remove runs** retention makes eligible. Each is re-checked under its run lock, then its
   directory is renamed to ``runs/.trash-*`` (atomic: the run is whole or gone) and deleted.
   Strays (a run-id name that is not a directory holding a regular ``manifest.toml``) are
   reported and skipped. Every terminal run's first sighting is recorded (retention.py):
   a run is eligible only once gc itself has seen it terminal for the rule's hold.
2. **Snapshot pins**: the pin files in ``blobs/pins/`` present now. Pins that are settled
   (their flock is free; ``*.done`` from casruns 0.1) or whose writer is dead were committed (or abandoned) before the mark, so
   the mark covers them: they are not roots, and they are deleted at the end.
3. **Mark**: every blob reachable from the remaining manifests (log refs, artifact trees and
   the files they list), plus plugin gc roots. An unreadable manifest or corrupt tree aborts
   gc; a referenced blob that is missing (a damaged reference, a lost blob) skips phases 4
   and 5's blob deletions and is reported: the blob meant may be any unreferenced one, so
   gc never deletes what it cannot prove unreferenced.
4. **Sweep**, in chunks under the exclusive sweep lock: re-read every pin file not settled
   at the snapshot (live ones, and any that settled or died since: a reference added after
   the mark),
   then delete each unreachable, unpinned blob whose mtime is older than the grace period.
   Packs: one whose unreachable blobs make up enough of it is rewritten without them (the
   new pack durable first), then the old one deleted under the exclusive lock unless one of
   its garbage blobs was pinned or it was touched meanwhile.
   Writers pin an address, then check for the blob, under the shared sweep lock; so either
   gc sees the pin or the writer sees the blob gone and writes it again.
5. **Temp files** in ``blobs/tmp`` older than the grace period whose writer's pid is not
   alive, the pins settled at the snapshot, and the leftovers ``reap`` cleans. Before that,
   small packs are merged (every entry copied, the new pack durable and read back first).

Clock jumps: correctness rests on pins and locks, not time. The grace period is a second
line (puts made without a pin); a blob, pack or temp file with an mtime in the future is kept,
but one more than FUTURE_LIMIT ahead gets its mtime set to now (so the grace runs from now).
Crash safety: every step is idempotent; SIGKILL at any point leaves every manifest's blobs
in place and the next gc completes the work.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import faults, fsutil, locking, pins, recovery
from . import manifest as mf
from . import retention
from .errors import BlobNotFound, Busy, CasrunsError, CorruptManifest, RegistryError, RunNotFound
from .retention import keep_last_protected, safe_retention_of
from .ids import is_address
from .runs import iter_run_ids, run_stray

if TYPE_CHECKING:
    from .root import RegistryRoot

SCHEMA = "casruns/gc/v1"
CHUNK = 1000
FUTURE_LIMIT = 86400.0  # an mtime further ahead than this is no one's honest clock: reset to now
CLOCK_SLACK = 60.0  # a clock this far behind the previous gc's has gone backwards
MISSING_LIMIT = 1000  # missing references listed in the report (all are counted)
REMOVAL_BATCH = 200  # removed runs whose events wait (each an open, flocked pending record) for one directory sync


@dataclass
class GCStats:
    dry_run: bool = False
    runs_removed: int = 0
    runs_kept: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    blobs_kept: int = 0
    blobs_pinned: int = 0
    blobs_in_grace: int = 0
    temps_removed: int = 0
    pins_removed: int = 0
    trash_removed: int = 0
    packs_removed: int = 0
    packs_rewritten: int = 0
    pack_blobs_unused: int = 0
    pack_bytes_unused: int = 0
    packs_unreadable: int = 0
    packs_merged: int = 0
    duration_s: float = 0.0
    swept: bool = True  # False: a referenced blob is missing, so nothing was swept
    blobs_missing: int = 0
    missing: list = field(default_factory=list)  # [{run_id, address, where}]
    trees_unreadable: list = field(default_factory=list)  # [{run_id, address, code, message}]
    strays: list = field(default_factory=list)  # [{path, kind}]
    runs_first_seen: int = 0
    mtimes_reset: int = 0
    events_settled: int = 0  # pending events of dead writers published (recovered) or dropped
    event_segments_removed: int = 0

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}


def _fault(point: str) -> None:
    faults.point("gc_" + point)


def collect_garbage(registry: "RegistryRoot", *, dry_run: bool = False, wait: bool = False, progress=None) -> dict:
    t0 = time.monotonic()
    stats = GCStats(dry_run=dry_run)
    if not registry.check_format():
        return stats.to_json()
    fsutil.ensure_dir(os.path.join(registry.root, "locks"))
    lock_path = os.path.join(registry.root, "locks", "gc.lock")
    lock = locking.FileLock(lock_path, record=True)
    previous = locking.read_record(lock_path) or {}  # the last gc's record, before ours replaces it
    if not lock.acquire(blocking=wait):
        rec = locking.read_record(lock_path) or {}
        raise Busy(f"another gc is running (pid {rec.get('pid', '?')} on {rec.get('host', '?')}); try again or use --wait")
    try:
        _run(registry, stats, dry_run, progress, previous.get("acquired_at"))
    finally:
        lock.release()
    stats.duration_s = round(time.monotonic() - t0, 3)
    return stats.to_json()


def _run(registry: "RegistryRoot", stats: GCStats, dry_run: bool, progress, previous_at=None) -> None:
    store = registry.store
    config = registry.config
    runs_dir = registry.runs_dir
    grace = config.gc_grace
    # A clock behind the one the previous gc had has gone backwards since: whatever this gc
    # stamps now (first sightings, reset mtimes) would later look older than it is.
    clock_behind = isinstance(previous_at, (int, float)) and retention.wall_clock() < previous_at - CLOCK_SLACK

    # 0. finish interrupted deletions
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
        if name.startswith(".trash-"):
            if not dry_run:
                shutil.rmtree(os.path.join(runs_dir, name), ignore_errors=True)
            stats.trash_removed += 1
    _fault("after_trash")

    # plugin roots are asked first: a run a plugin names is kept, not removed and then missed
    plugin_roots = [str(r) for _, roots in registry.plugins.call("casruns_gc_roots", registry_root=registry.root) for r in roots or ()]
    protected_runs = {r for r in plugin_roots if not is_address(r)}

    # 1. remove eligible runs (recording gc's own first sighting of every terminal run)
    strays: dict[str, dict] = {}
    manifests = {}
    for rid in iter_run_ids(runs_dir):
        try:
            m = _read_run(registry, rid, strays)
        except CasrunsError:
            continue  # unreadable: never eligible, and verify reports it
        if m is not None:
            manifests[rid] = m
    kept = keep_last_protected(manifests.values(), config)
    now = retention.wall_clock()
    boot = retention.boot_clock()
    sightings = {}
    for rid, m in manifests.items():
        if m.get("status") in mf.TERMINAL:
            sightings[rid] = _sighting(registry.run_dir(rid).path, m, config, now, boot, stats, dry_run or clock_behind)
    _fault("after_sightings")

    def retention_now(rid: str, m: dict) -> dict:
        return safe_retention_of(m, config, now=now, kept_by=kept.get(rid), sighting=sightings.get(rid), boot=boot) or {}

    eligible = [rid for rid, m in manifests.items() if rid not in protected_runs and retention_now(rid, m).get("cleanup_eligible")]
    dirs = fsutil.DirSync()
    trash = []
    removals = []  # the runs' `removed` events, published once their renames are durable

    def publish_removals() -> None:
        dirs.sync()
        for pending in removals:
            pending.publish()
        removals.clear()
        while trash:  # published: delete them now, so a full disk gets room batch by batch
            shutil.rmtree(trash.pop(), ignore_errors=True)

    would_remove: set[str] = set()  # dry run: what the mark must treat as gone
    try:
        for i, rid in enumerate(sorted(eligible)):
            if progress:
                progress("removing runs", i + 1, len(eligible))
            run = registry.run_dir(rid)
            try:
                with run.locked():
                    m = _read_run(registry, rid, strays)  # the cache's tag proves it matches the TOML (a parse costs 0.75 ms)
                    if m is None or not retention_now(rid, m).get("cleanup_eligible"):
                        continue  # promoted or retained since we looked
                    if dry_run:
                        stats.runs_removed += 1
                        would_remove.add(rid)
                        continue
                    target = os.path.join(runs_dir, f".trash-{rid}-{os.urandom(4).hex()}")
                    removals.append(run.remove(target, "retention"))
                    trash.append(target)
                    dirs.add(runs_dir)
            except CasrunsError:
                continue
            stats.runs_removed += 1
            manifests.pop(rid, None)
            _fault("after_run_rename")
            if len(removals) >= REMOVAL_BATCH:
                publish_removals()
    finally:
        publish_removals()  # the renames are durable before anything they referenced can be swept
    _fault("after_runs_removed")

    # 2. snapshot pins (2a: done/dead pins are covered by the mark and removed at the end)
    pins_dir = store.pins_dir
    settled_at_start = pins.settled_pins(pins_dir)
    settled = set(settled_at_start)

    # 3. mark
    reachable: set[str] = set()
    ids = sorted(set(iter_run_ids(runs_dir)) - would_remove)
    marked = []
    unreadable: list = []
    for i, rid in enumerate(ids):
        if progress:
            progress("marking", i + 1, len(ids))
        try:
            m = _read_run(registry, rid, strays)
        except CasrunsError as e:
            raise CorruptManifest(f"gc stopped before sweeping: run {rid} cannot be read ({e.message}); run casruns verify") from None
        if m is None:
            continue  # a stray: not a run, references nothing
        marked.append((rid, m))
        reachable.update(referenced_addresses(registry, m, unreadable))
    stats.runs_kept = len(marked)
    for root in plugin_roots:
        if not is_address(root):
            try:
                m = _read_run(registry, root, {})
            except CasrunsError:
                m = None
            if m is not None:
                reachable.update(referenced_addresses(registry, m))
    stats.strays = [strays[p] for p in sorted(strays)]
    _fault("after_mark")

    # Every referenced blob must be present (loose, or in a readable pack) before anything is
    # swept: a reference to a missing blob may be a damaged copy of an unreferenced blob's
    # address, which is then the only copy of the run's data (spec: "Missing references").
    loose = list(store.iter_loose_addresses())
    present = set(loose)
    for name in store.pack_names():  # a fresh look at blobs/packs/, after the mark
        present.update(store.pack_index(name))
    if not reachable <= present:
        _report_missing(registry, marked, reachable - present, stats)
    if unreadable:
        # what an unreadable (or oversized) tree references is unknown: nothing may be swept
        stats.swept = False
        stats.trees_unreadable = unreadable[:MISSING_LIMIT]
    reachable.update(r for r in plugin_roots if is_address(r))
    stats.blobs_kept = len(reachable)
    now = time.time()
    if not stats.swept:
        _finish(registry, store, pins_dir, settled_at_start, now, grace, stats, dry_run)
        return

    # 4. sweep: loose blobs, then packs
    candidates = [a for a in loose if a not in reachable]
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start : start + CHUNK]
        if progress:
            progress("sweeping", min(start + CHUNK, len(candidates)), len(candidates))
        with store.exclusive():
            pinned = pins.read_pins(pins_dir, skip=settled)
            for address in chunk:
                if address in pinned:
                    stats.blobs_pinned += 1
                    continue
                path = store.path_for(address)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if _young(path, st, now, grace, stats, dry_run, clock_behind):
                    stats.blobs_in_grace += 1
                    continue
                if not dry_run and not store.remove_loose(address):
                    continue  # already gone
                stats.blobs_removed += 1
                stats.bytes_freed += st.st_size
                if stats.blobs_removed == 1:
                    _fault("after_first_delete")
    _sweep_packs(store, reachable, settled, grace, now, stats, dry_run, progress, clock_behind)
    stats.blobs_kept += stats.blobs_pinned + stats.blobs_in_grace

    # 5. temp files, settled pins, leftovers
    for path in list(store.iter_temp_files()):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if fsutil.writer_alive(path.name):
            continue  # its writer is alive
        if not _young(path, st, now, grace, stats, dry_run, clock_behind):
            if not dry_run:
                store.remove_temp(path)
            stats.temps_removed += 1
    _finish(registry, store, pins_dir, settled_at_start, now, grace, stats, dry_run)


def _finish(registry, store, pins_dir, settled_at_start, now: float, grace: float, stats: GCStats, dry_run: bool) -> None:
    """The end of every gc, swept or not: settled and stale pins, leftovers."""
    # pins of writers killed while creating them, and pins the mark covered
    for p in [*pins.stale_new_pins(pins_dir, now), *settled_at_start]:
        if not dry_run:
            pins.remove(p)
        stats.pins_removed += 1
    if not dry_run:
        stats.temps_removed += recovery.clean_leftovers(registry, grace)
        stats.events_settled = recovery.settle_events(registry)
    from .runs import journal_of

    journal = journal_of(registry.runs_dir)
    stats.event_segments_removed = journal.expire(now - registry.config.events_keep, dry_run=dry_run)
    if not dry_run and os.path.isdir(journal.dir):
        journal.refill_reserve()  # used up by a full disk, and there may be room again


def _young(path, st, now: float, grace: float, stats: GCStats, dry_run: bool, clock_behind: bool) -> bool:
    """Whether a blob, pack or temp file is too young to delete (a future mtime counts as young).

    An mtime more than FUTURE_LIMIT ahead was not written by an honest clock (a clock that far
    ahead, since corrected, or a tampered file); kept as it is, it would never be collected.
    It is set to now, so the grace period runs from now and a later gc judges it as usual: a
    writer that put the file is then protected as long as one that put it this moment. Not
    when this gc's own clock went backwards since the previous gc (``clock_behind``): then the
    file may be young and our "now" old.
    """
    age = now - st.st_mtime
    if age < -FUTURE_LIMIT and not clock_behind:
        if not dry_run:
            try:
                os.utime(path, (now, now))
            except OSError:
                return True  # (read-only, or gone): kept, and tried again next time
        stats.mtimes_reset += 1
        return True
    return age < grace


def _read_run(registry: "RegistryRoot", rid: str, strays: dict[str, dict]) -> dict | None:
    """The manifest of run ``rid``, or None (noted in ``strays``) when the name is not a run
    (runs.run_stray: decided by lstat, nothing that could block or lead outside is opened). A
    directory with a regular ``manifest.toml`` is a run: if that file cannot be read or parsed,
    the error propagates and stops the sweep. A ``manifest.json`` cache that is not a regular
    file is a stray too; the TOML is read.
    """
    stray = run_stray(registry.runs_dir, rid)
    if stray is not None:
        strays[stray["path"]] = stray
        return None
    run = registry.run_dir(rid)
    try:
        cst = os.lstat(os.path.join(run.path, "manifest.json"))
    except (FileNotFoundError, NotADirectoryError):
        cst = None
    except OSError:
        return None  # gone since the listing: nothing to keep
    if cst is not None and not stat.S_ISREG(cst.st_mode):
        kind = fsutil.kind_of(cst.st_mode)
        path = f"runs/{rid}/manifest.json"
        strays[path] = {"path": path, "kind": kind, "run_id": rid, "message": f"{path} is a {kind.replace('_', ' ')}, not a regular file; the TOML is read"}
    # Decisions that delete rest on the TOML's bytes, checksum checked; the cache only spares
    # the parse when it was built from exactly these bytes (spec/format.md, "What each reader trusts").
    try:
        return run.read_fresh()
    except RunNotFound:
        return None  # gone since the listing


def _sighting(run_path: str, m: dict, config, now: float, boot, stats: GCStats, dry_run: bool):
    """gc's first sighting of terminal run ``m``, recorded now if there is none yet.

    A sighting in the future (made by a clock ahead of this one) is replaced by one made now.
    Only a run whose record says its time is up needs the sighting read; for the others it is
    enough that one exists and is not in the future (its mtime is the time it records).
    Returns the sighting, or None (judged as seen now) when it was not read or none could be
    written (a dry run, a clock gone backwards, a stray in its place, a read-only registry)."""
    try:
        by_record = retention.record_until(m, config)
    except (CasrunsError, TypeError, ValueError):
        by_record = None  # unparseable retention fields: never eligible, so a sighting cannot matter
    if by_record is not None and by_record[1] <= now:
        existing = retention.read_sighting(run_path)
        if existing is not None and existing.elapsed(now, boot) is not None:
            return existing
    else:
        try:
            if os.lstat(retention.sighting_path(run_path)).st_mtime <= now:
                return None  # its time is not up by its own record, so what the sighting says cannot matter yet
        except OSError:
            pass  # none yet
    if dry_run:
        return None
    try:
        s = retention.write_sighting(run_path, now, boot)
    except (CasrunsError, OSError):
        return None
    stats.runs_first_seen += 1
    return s


def _report_missing(registry: "RegistryRoot", marked: list, missing: set[str], stats: GCStats) -> None:
    """Skip the sweep, and name each missing blob with the runs and places that reference it."""
    stats.swept = False
    stats.blobs_missing = len(missing)
    out = []
    for rid, m in marked:
        for where, address in _references(registry, m):
            if address in missing and len(out) < MISSING_LIMIT:
                out.append({"run_id": rid, "address": address, "where": where})
    stats.missing = out


REWRITE_FRACTION = 0.2  # a pack is rewritten once this share of its stored bytes is garbage


def _sweep_packs(
    store, reachable: set[str], settled: set[str], grace: float, now: float, stats: GCStats, dry_run: bool, progress, clock_behind: bool = False
) -> None:
    """Delete packs whose blobs are all garbage; rewrite packs with enough garbage.

    A rewrite copies the live frames into a new pack that is durable before the old one is
    deleted. The old pack is deleted under the exclusive sweep lock, and only if no garbage
    blob of it was pinned (a writer relies on a packed copy only after pinning it) and the
    file was not replaced since we looked; otherwise it stays, and the rewritten copy is a
    harmless duplicate. A pack's mtime is its creation time (dedup hits do not touch it), so
    ``gc_grace`` protects new packs and never keeps garbage alive because a blob is popular.
    """
    names = store.pack_names()
    stats.packs_unreadable = len(store.bad_packs)  # never deleted: gc cannot prove them garbage
    for i, name in enumerate(names):
        if progress:
            progress("sweeping packs", i + 1, len(names))
        index = store.pack_index(name)
        dead = [a for a in index if a not in reachable]
        if not dead:
            continue
        path = store.pack_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if _young(path, st, now, grace, stats, dry_run, clock_behind):
            stats.blobs_in_grace += len(dead)
            continue
        dead_bytes = sum(index[a].length for a in dead)
        live = set(index).difference(dead)
        if live and dead_bytes < REWRITE_FRACTION * sum(e.length for e in index.values()):
            stats.pack_blobs_unused += len(dead)
            stats.pack_bytes_unused += dead_bytes
            continue
        new_size, new = 0, None
        if live and not dry_run:
            try:
                new = store.rewrite_pack(name, live)
            except OSError:
                continue  # gone meanwhile (a quarantine rewrote it), or a full disk: the next gc looks again
            new_size = os.stat(store.pack_path(new)).st_size
            _fault("after_pack_rewrite")
        with store.exclusive():
            pinned = pins.read_pins(store.pins_dir, skip=settled)
            in_use = [a for a in dead if a in pinned]
            try:
                touched = os.stat(path).st_mtime_ns != st.st_mtime_ns
            except FileNotFoundError:
                continue
            if in_use or touched:
                stats.blobs_pinned += len(in_use)
                stats.blobs_in_grace += len(dead) - len(in_use)
                continue
            if new == name or not (dry_run or store.unlink_pack(name)):
                continue  # (names are content hashes: never delete what was just written)
        stats.blobs_removed += len(dead)
        stats.bytes_freed += max(st.st_size - new_size, 0)
        stats.packs_removed += 1
        stats.packs_rewritten += 1 if live else 0
    if not dry_run:
        _merge_small_packs(store, stats, progress)


MERGE_BELOW = 4 << 20  # packs smaller than this are merged, so readers have few indexes to load
MERGE_MIN = 8  # ... once there are at least this many of them
MERGE_GROUP = 256  # source packs per merged pack


def _merge_small_packs(store, stats: GCStats, progress) -> None:
    """Merge small packs (casruns.packset does it; these thresholds are gc's policy)."""
    stats.packs_merged += store.merge_small_packs(
        below=MERGE_BELOW, at_least=MERGE_MIN, group=MERGE_GROUP, progress=progress, merged_hook=lambda: _fault("after_pack_merge")
    )


def referenced_addresses(registry: "RegistryRoot", m: dict, unreadable: list | None = None) -> set[str]:
    """Every blob a manifest references: log blobs, the artifact tree and its files."""
    return {address for _, address in _references(registry, m, unreadable)}


def _references(registry: "RegistryRoot", m: dict, unreadable: list | None = None):
    """(where, address) for every blob a manifest references (tree.blob_refs). A tree that is
    present but cannot be read, parsed or is over its size cap is appended to ``unreadable``
    (the caller then sweeps nothing, and reports it); without that list it stops gc."""
    from .tree import blob_refs

    try:
        yield from blob_refs(registry.store, m, unreadable)
    except CasrunsError as e:
        raise CorruptManifest(
            f"gc stopped before sweeping: the artifact tree of run {m.get('run_id')} cannot be read ({e.message}); "
            "run casruns verify"
        ) from None
