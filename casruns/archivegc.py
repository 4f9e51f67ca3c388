"""The fleet archive's gc: expired runs, then blobs no remaining run references, while other
machines push (spec/archive-gc.md, which enumerates the races this order closes).

One ``archive gc`` does, under the archive's gc lock (``gc/lock``, a conditional create,
rewritten every lease period, stale after three):

1. **Expire.** Runs whose archive retention (``config.toml``, casruns/archiveconfig.py) is up,
   judged in the store's clock, lose their manifest: removed only if it is still the version
   judged (a run re-pushed meanwhile, say promoted elsewhere, is kept).
2. **Resume or mark.** An open mark (one an earlier gc left) is swept if it is ready; with none
   open, a new mark lists the blobs no manifest references, and the push leases present then.
3. **Sweep**, once the mark is ``grace`` old in store time and every lease seen at the mark has
   ended or gone stale: under a sweep object, list the manifests again and delete each
   candidate still unreferenced whose store time is older than the mark's.

Every deletion is preceded by a deletion record's intent (``gc/records/...``) and completed in
it. Killed anywhere, the next gc resumes: the lock goes stale, a mark without its lease list is
discarded, a half-done sweep is done again (deleting what is gone is a no-op).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from . import archiveconfig, archiveindex, faults
from . import archiveproto as proto
from .errors import ArchiveUnavailable, Busy, CasrunsError
from .timefmt import format_ts, parse_ts

SCHEMA = "casruns/archive-gc/v1"
RECORD_SCHEMA = "casruns/archive-gc-record/v1"
MARK_SCHEMA = "casruns/archive-gc-mark/v1"
BATCH = 1000  # deletions a request (S3 DeleteObjects)
RESTARTS = 5  # sweeps started over (its object went too long unrefreshed) before gc gives up for this time


def gc(registry, dest: str, *, dry_run: bool = False, wait: bool = False, progress=None, sleep=time.sleep) -> dict:
    from .archive import _check_marker, open_remote

    remote = open_remote(dest, registry)
    _check_marker(remote)
    settings, _ = archiveconfig.read(remote)
    me = proto.machine_of(registry)
    gc_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{proto.nonce()}"  # a name only: never compared
    now = proto.store_now(remote, gc_id)
    report = {
        "schema": SCHEMA, "dest": remote.url, "dry_run": dry_run, "gc_id": gc_id, "machine": me, "store_time": format_ts(now),
        "runs_removed": [], "runs_changed": 0, "runs_unreadable": [], "blobs_removed": 0, "bytes_removed": 0,
        "blobs_spared": 0, "mark": None, "marks_swept": [], "record": None, "index": None,
    }
    lock = None if dry_run else _take_lock(remote, gc_id, me, now, settings)
    state = _Run(remote, settings, me, gc_id, report, lock, progress, registry.config)
    try:
        faults.point("archive_gc_after_lock")
        if not dry_run:
            # sweep objects of dead gcs (stale in store time): pushes would wait out each one
            dead = [o.key for o in remote.objects(proto.SWEEPS) if proto.stale_after(remote, o.key, settings.lease, now - o.mtime)]
            remote.delete(dead)
        runs = state.read_runs()
        if not dry_run:
            state.references(runs)  # blob lists (and index entries) now: the mark and sweep reuse them
        state.expire(runs, now, dry_run)
        marks = _open_marks(remote)
        if dry_run:
            going = {r["run_id"] for r in report["runs_removed"]}  # would expire: their blobs would not count
            refs, unreadable = state.references({rid: v for rid, v in runs.items() if rid not in going})
            blobs = remote.objects("blobs")
            doomed = [o for o in blobs if _address(o.key) not in refs]
            report["blobs_removed"] = len(doomed) if not unreadable else 0
            report["bytes_removed"] = sum(o.size for o in doomed) if not unreadable else 0
            report["mark"] = {"id": None, "state": "dry_run", "candidates": len(doomed), "open_marks": len(marks)}
            return report
        for mark_id, mark in marks.items():
            state.sweep_if_ready(mark_id, mark, wait=wait, sleep=sleep)
        if not _open_marks(remote):
            mark_id, mark = state.make_mark()
            if mark is not None:
                state.sweep_if_ready(mark_id, mark, wait=wait, sleep=sleep)
        if state.runs is not None and (state.runs or state.index.segments):
            state.references(state.runs)  # entries for runs read from their manifests
            state.check_lock()
            state.compact_index(state.runs)
        if state.record is not None and state.record.get("state") != "done":
            state.write_record("done")  # an "intent" left behind means: that gc was killed
        return report
    finally:
        if lock is not None:
            lock.stop()


def _address(key: str) -> str:
    parts = key.split("/")
    return parts[1] + parts[2] if len(parts) == 3 and parts[0] == "blobs" else key


def _take_lock(remote, gc_id: str, me: dict, now: float, settings) -> proto.Refresher:
    doc = {"schema": "casruns/archive-gc-lock/v1", "gc_id": gc_id, "machine": me}
    for _ in range(3):
        version = remote.put_if(proto.dump({**doc, "n": 0}), proto.LOCK, None)
        if version is not None:
            lock = proto.Refresher(remote, proto.LOCK, doc, settings.lease, version_guard=True)
            lock.version = version
            return lock.start(written=True)
        held = remote.stat(proto.LOCK)
        if held is None:
            continue
        if proto.stale_after(remote, proto.LOCK, settings.lease, now - held.mtime):
            remote.delete_if(proto.LOCK, held.version)  # its holder is gone: take it over (that version only)
            continue
        other = proto.read_json(remote, proto.LOCK) or {}
        machine = other.get("machine") if isinstance(other.get("machine"), dict) else {}
        who = proto.printable(machine.get("host") or "another machine")
        raise Busy(f"{remote.url}: an archive gc is running ({who}, gc {proto.printable(other.get('gc_id'))}); its lock goes stale "
                   f"{proto.STALE_AFTER * settings.lease:.0f}s after its last refresh")
    raise Busy(f"{remote.url}: the gc lock keeps changing hands; try again")


def _open_marks(remote) -> dict[str, dict]:
    """Marks left open (by this gc, an earlier one, or a dead one), with their store time and
    the leases seen right after them (None: the gc died before it listed them)."""
    objs = {o.key: o for o in remote.objects(proto.MARKS)}
    out = {}
    for key, o in objs.items():
        if not key.endswith(".json"):
            continue
        mark_id = key.rsplit("/", 1)[-1][: -len(".json")]
        doc = proto.read_json(remote, f"{proto.MARKS}/{mark_id}.leases") if f"{proto.MARKS}/{mark_id}.leases" in objs else None
        leases = (doc or {}).get("leases")
        if doc is not None and not (isinstance(leases, list) and all(isinstance(k, str) for k in leases)):
            leases = ["?"]  # malformed: it may have named any lease, so wait for every lease to go
        out[mark_id] = {"t0": o.mtime, "version": o.version, "leases": None if doc is None else leases}
    return out


class _Run:
    """One gc invocation's state: the archive, its settings, the report, the lock."""

    def __init__(self, remote, settings, me, gc_id, report, lock, progress, config=None) -> None:
        self.remote, self.settings, self.me, self.gc_id = remote, settings, me, gc_id
        self.report, self.lock, self.progress = report, lock, progress
        self.trees: dict[str, frozenset[str]] = {}
        self.entries: dict[str, dict] = {}  # run id -> its index entry (from the index, or made from its manifest)
        self.index = archiveindex.Index()
        self.from_index: set[str] = set()  # runs judged from an index entry (re-read before deletion)
        self.config = config
        self.runs: dict | None = None  # the newest listing read
        self.record_key: str | None = None
        self.record: dict | None = None

    # -- reading the archive ---------------------------------------------------------------

    def read_runs(self) -> dict[str, tuple]:
        """run id -> (its manifest object, the manifest or None if unreadable, its blobs or None).

        A run whose index entry was written for the very manifest version listed now is taken
        from the index (its retention fields and blob list: no GET); any other is read."""
        from .archive import remote_manifest

        out = {}
        objs = [o for o in self.remote.objects("runs") if o.key.endswith("/manifest.toml") and o.key.count("/") == 2]
        self.index = archiveindex.load(self.remote)
        for i, o in enumerate(objs):
            if self.progress:
                self.progress("reading manifests", i + 1, len(objs))
            rid = o.key.split("/")[1]
            e = self.index.entry(rid, o.version)
            known = self.entries.get(rid)
            if e is None and known is not None and known["version"] == o.version:
                e = known  # read (or rebuilt) earlier in this gc, and unchanged since
            m = archiveindex.as_manifest(e) if e is not None else None
            if m is not None:
                out[rid] = (o, m, set(e["blobs"]))
                self.entries[rid] = e
                self.from_index.add(rid)
                continue
            try:
                out[rid] = (o, remote_manifest(self.remote, rid), None)
            except CasrunsError as e:
                if e.code == "run_not_found":
                    continue  # removed since the listing
                out[rid] = (o, None, None)
                self.unreadable(rid, e.code, e.message)
        self.runs = out
        return out

    def blobs_of(self, rid: str, m: dict) -> set[str] | None:
        """Every blob a manifest references (logs, tree, the tree's files); None if its tree
        cannot be read."""
        from .archive import archived_tree

        refs = {r["blake3"] for r in (m.get("logs") or {}).values() if isinstance(r, dict) and r.get("blake3")}
        tree = (m.get("artifacts") or {}).get("tree")
        if tree:
            refs.add(tree)
            if tree not in self.trees:
                try:
                    self.trees[tree] = frozenset(archived_tree(self.remote, m).addresses())
                except CasrunsError as e:
                    self.unreadable(rid, e.code, f"its artifact tree: {e.message}")
                    return None
            refs |= self.trees[tree]
        return refs

    def references(self, runs: dict) -> tuple[set[str], bool]:
        """Every blob the manifests reference, and whether some could not be read (then nothing
        may be swept: what it references is unknown)."""
        refs: set[str] = set()
        unreadable = False
        for rid, (o, m, blobs) in runs.items():
            if m is None:
                unreadable = True
                continue
            if blobs is None:
                blobs = self.blobs_of(rid, m)
                if blobs is None:
                    unreadable = True
                    continue
                runs[rid] = (o, m, blobs)
                self.entries[rid] = archiveindex.entry(rid, o.version, m, sorted(blobs), self.config)
            refs |= blobs
        return refs, unreadable

    def compact_index(self, runs: dict) -> None:
        """One index segment for the runs as this gc last listed them (so the next list and gc
        need no manifest GETs); segments this gc read are folded into it, newer ones stay."""
        live = {rid: self.entries[rid] for rid, (o, m, blobs) in runs.items()
                if rid in self.entries and self.entries[rid]["version"] == o.version}
        self.report["index"] = archiveindex.compact(self.remote, proto.machine_key(self.me), live, folded=self.index.segments)

    def unreadable(self, rid: str, code: str, message: str) -> None:
        if all(u["run_id"] != rid for u in self.report["runs_unreadable"]):
            self.report["runs_unreadable"].append({"run_id": rid, "code": code, "message": message})

    # -- the deletion record ---------------------------------------------------------------

    def write_record(self, state: str, **changes) -> None:
        if self.record is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(parse_ts(self.report["store_time"])))
            self.record_key = f"{proto.RECORDS}/{stamp}-{proto.machine_key(self.me)}-{self.gc_id}.json"
            self.record = {"schema": RECORD_SCHEMA, "gc_id": self.gc_id, "machine": self.me, "started_at": self.report["store_time"],
                           "runs_removed": [], "blobs_removed": [], "bytes_removed": 0, "marks_swept": []}
            self.report["record"] = self.record_key
        self.record.update(changes, state=state)
        self.remote.put_bytes(proto.dump(self.record), self.record_key)

    def check_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise Busy(f"{self.remote.url}: this gc lost its lock (it was judged stale); stopping before deleting more")

    # -- 1. expire -------------------------------------------------------------------------

    def expire(self, runs: dict, now: float, dry_run: bool) -> None:
        from . import retention

        s = self.settings
        protected = retention.keep_last_protected((m for _, m, _ in runs.values() if m is not None), SimpleNamespace(keep_last=s.keep_last))
        doomed = []
        for rid, (o, m, blobs) in sorted(runs.items()):
            if m is None or rid in protected:
                continue
            rule = _expired(m, s, now, o.mtime)
            if rule and rid in self.from_index:
                # judged from the index: judge again from the manifest itself before deleting it
                # (the delete is If-Match the listed version, so a newer one is kept anyway)
                from .archive import remote_manifest

                try:
                    m = remote_manifest(self.remote, rid)
                except CasrunsError:
                    continue
                rule = _expired(m, s, now, o.mtime)
            if rule:
                doomed.append((rid, o, m, rule))
        if not doomed:
            return
        planned = [{"run_id": rid, "status": m.get("status"), "rule": rule, "origin": m.get("origin")} for rid, o, m, rule in doomed]
        if dry_run:
            self.report["runs_removed"] = planned
            return
        self.check_lock()
        self.write_record("intent", runs_planned=planned)
        for i, (rid, o, m, rule) in enumerate(doomed):
            if self.progress:
                self.progress("removing expired runs", i + 1, len(doomed))
            if self.remote.delete_if(o.key, o.version):
                self.report["runs_removed"].append(planned[i])
                runs.pop(rid, None)
            else:
                self.report["runs_changed"] += 1  # pushed again since it was judged: kept
            faults.point("archive_gc_mid_expire")
        self.write_record("intent", runs_removed=self.report["runs_removed"])

    # -- 2. mark ---------------------------------------------------------------------------

    def make_mark(self) -> tuple[str, dict | None]:
        runs = self.read_runs()
        refs, unreadable = self.references(runs)
        if unreadable:
            self.report["mark"] = {"id": None, "state": "unreadable", "candidates": 0}
            return self.gc_id, None
        candidates = sorted(a for a in (_address(o.key) for o in self.remote.objects("blobs")) if a not in refs)
        if not candidates:
            if self.report["mark"] is None:  # else it tells of the mark this gc swept
                self.report["mark"] = {"id": None, "state": "none", "candidates": 0}
            return self.gc_id, None
        self.check_lock()
        key = f"{proto.MARKS}/{self.gc_id}.json"
        self.remote.put_bytes(proto.dump({"schema": MARK_SCHEMA, "gc_id": self.gc_id, "machine": self.me, "candidates": candidates}), key)
        faults.point("archive_gc_after_mark")
        got = self.remote.stat(key)
        # Only now list the leases: a push whose lease is not in this list wrote it after the
        # mark was visible, so it reads the mark and touches what it relies on (race 4)
        leases = sorted(o.key for o in self.remote.objects(proto.LEASES))
        self.remote.put_bytes(proto.dump({"schema": MARK_SCHEMA, "gc_id": self.gc_id, "leases": leases}), f"{proto.MARKS}/{self.gc_id}.leases")
        self.report["mark"] = {"id": self.gc_id, "state": "made", "candidates": len(candidates)}
        return self.gc_id, {"t0": got.mtime, "version": got.version, "leases": leases, "candidates": candidates}

    # -- 3. sweep --------------------------------------------------------------------------

    def sweep_if_ready(self, mark_id: str, mark: dict, *, wait: bool, sleep) -> None:
        r = self.remote
        if mark["leases"] is None:
            # its gc died between the mark and the lease list: it cannot be judged, so drop it
            r.delete([f"{proto.MARKS}/{mark_id}.json"])
            self.report["mark"] = {"id": mark_id, "state": "discarded", "candidates": 0}
            return
        while True:
            now = proto.store_now(r, f"{self.gc_id}-{mark_id}")
            t0 = mark["t0"]
            named = set(mark["leases"])
            live = [o.key for o in r.objects(proto.LEASES) if (o.key in named or "?" in named)
                    and not proto.stale_after(r, o.key, self.settings.lease, now - o.mtime)]
            waiting = None
            if now - t0 < self.settings.grace:
                waiting = {"reason": "grace", "ready_at": format_ts(t0 + self.settings.grace)}
            elif live:
                waiting = {"reason": "pushes", "leases": live}
            if waiting is None:
                break
            if not wait:
                self.report["mark"] = {"id": mark_id, "state": "waiting", "candidates": len(mark.get("candidates") or ()), **waiting}
                return
            self.check_lock()
            sleep(min(max(1.0, self.settings.lease / 2), 5.0))
        if "candidates" not in mark:
            doc = proto.read_json(r, f"{proto.MARKS}/{mark_id}.json")
            listed = (doc or {}).get("candidates")
            if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
                r.delete([f"{proto.MARKS}/{mark_id}.json", f"{proto.MARKS}/{mark_id}.leases"])
                self.report["mark"] = {"id": mark_id, "state": "discarded", "candidates": 0}
                return
            mark["candidates"] = list(listed)
        self._sweep(mark_id, mark)

    def _sweep(self, mark_id: str, mark: dict) -> None:
        r = self.remote
        self.check_lock()
        sweep = proto.Refresher(r, f"{proto.SWEEPS}/{mark_id}", {"schema": "casruns/archive-gc-sweep/v1", "gc_id": self.gc_id,
                                                                  "machine": self.me}, self.settings.lease).start()
        try:
            now_mark = r.stat(f"{proto.MARKS}/{mark_id}.json")
            if now_mark is None or now_mark.version != mark.get("version", now_mark.version):
                # another gc (one that judged this one dead) discarded or replaced the mark:
                # pushes since may not have touched for it, so it must not be swept
                self.report["mark"] = {"id": mark_id, "state": "discarded", "candidates": 0}
                return
            removed, spared, size = self._delete_unreferenced(mark, sweep)
            if removed is None:
                self.report["mark"] = {"id": mark_id, "state": "unreadable", "candidates": len(mark["candidates"])}
                return
            faults.point("archive_gc_after_sweep")
            self.report["blobs_removed"] += len(removed)
            self.report["bytes_removed"] += size
            self.report["blobs_spared"] += spared
            self.write_record("done", blobs_removed=sorted(set(self.record.get("blobs_removed", []) if self.record else []) | set(removed)),
                              bytes_removed=self.report["bytes_removed"],
                              marks_swept=(self.record or {}).get("marks_swept", []) + [mark_id])
            r.delete([f"{proto.MARKS}/{mark_id}.json", f"{proto.MARKS}/{mark_id}.leases"])
            self.report["mark"] = {"id": mark_id, "state": "swept", "candidates": len(mark["candidates"])}
            self.report["marks_swept"].append(mark_id)
        finally:
            sweep.stop()

    def _delete_unreferenced(self, mark: dict, sweep) -> tuple[list[str] | None, int, int]:
        """Delete the mark's candidates that no manifest references now and that nobody wrote
        since the mark. Listed only after the sweep object is visible (pushers that touch after
        this wait for the sweep to end). Returns (deleted, spared, bytes), or None when some
        manifest could not be read."""
        r = self.remote
        done: list[str] = []
        size = 0
        restarts = 0
        while True:
            runs = self.read_runs()
            refs, unreadable = self.references(runs)
            if unreadable:
                return None, 0, 0
            blobs = {_address(o.key): o for o in r.objects("blobs")}
            doomed = [a for a in mark["candidates"] if a not in refs and a in blobs and blobs[a].mtime < mark["t0"]]
            spared = sum(1 for a in mark["candidates"] if a in blobs) - len(doomed)
            self.write_record("intent", blobs_planned=doomed)
            faults.point("archive_gc_after_sweep_start")
            restart = False
            restarts += 1
            if restarts > RESTARTS:
                raise ArchiveUnavailable(f"{r.url}: this gc's sweep object kept going unrefreshed for too long (writes slower than "
                                         f"gc.lease={self.settings.lease:g}s allows); its mark stays for the next gc; raise gc.lease")
            for i in range(0, len(doomed), BATCH):
                self.check_lock()
                if not sweep.healthy():
                    # paused long enough that a pusher may have judged this sweep dead and
                    # touched since: renew it and list everything again before deleting more
                    sweep.renew()
                    restart = True
                    break
                batch = doomed[i: i + BATCH]
                r.delete([blobs[a].key for a in batch])
                done += batch
                size += sum(blobs[a].size for a in batch)
                if self.progress:
                    self.progress("sweeping blobs", len(done), len(doomed))
                faults.point("archive_gc_mid_sweep")
            if not restart:
                return done, spared, size


def _expired(m: dict, s, now: float, stored_at: float) -> str | None:
    """The rule under which the archive's settings let this run go now, or None.

    Times recorded in the manifest came from the clock of the machine the run ran on; the
    manifest object's own store time (``stored_at``: when the archive last received it) is a
    floor under them, so a machine whose clock is behind cannot make a run expire early:
    a run is kept at least the rule's duration after the archive got its current record."""
    from . import manifest as mf

    if m.get("status") not in mf.TERMINAL:
        return None
    ret = m.get("retention") or {}
    try:
        finished = max(parse_ts(m.get("finished_at") or m.get("updated_at")), stored_at)
        if ret.get("promoted"):
            if s.promoted is None:
                return None
            last = next((h for h in reversed(ret.get("history") or []) if isinstance(h, dict) and h.get("action") == "promote"), None)
            since = max(parse_ts(last["at"]), stored_at) if last and last.get("at") else finished
            rule, until = "promoted", since + s.promoted
        else:
            keep = s.keep_for(m["status"])
            if keep is None:
                return None
            rule, until = f"status:{m['status']}", finished + keep
        # a run's own retention (retain --for/--until) can only keep it longer in an archive
        if ret.get("retain_until"):
            until = max(until, parse_ts(ret["retain_until"]))
        if ret.get("retain_for") is not None:
            until = max(until, finished + float(ret["retain_for"]))
    except (CasrunsError, KeyError, TypeError, ValueError):
        return None  # unparseable times: never expired by guesswork
    return rule if now >= until else None
