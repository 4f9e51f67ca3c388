"""Integrity verification: ``casruns verify``.

Checks, per run: the manifest (the TOML, never its cache) matches its checksum
(``manifest_checksum``), parses and has the fields and types spec/format.md requires;
every blob it references exists (log blobs, the artifact tree, each file the tree lists);
with ``read_data`` every referenced blob is decompressed and re-hashed. Verifying the whole
registry also reports orphaned blobs (unreferenced: gc's business, not an error) and, with
``read_data``, re-hashes every blob in the store.

*Strays* (spec/format.md, "Strays"): entries with a registry name but the wrong type, such as a
FIFO named like a run or a pack, or a run directory without a regular ``manifest.toml``. They are
listed in ``strays`` (path relative to the root, kind), count as findings, and are never opened.

``quarantine`` moves corrupt blobs to ``<root>/quarantine/<address>`` so nothing reads them
and a later ``archive pull`` can put a good copy back. A corrupt blob in a pack is copied out
and its pack rewritten without it; a pack whose index cannot be read (``pack_corrupt``) is
moved to ``quarantine/<name>.pack`` whole, since none of its blobs can be located.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import fsutil
from . import manifest as mf
from .errors import BlobNotFound, CasrunsError, IntegrityError
from .ids import is_run_id
from .runs import run_stray

if TYPE_CHECKING:
    from .root import RegistryRoot

SCHEMA = "casruns/verify/v1"


def check_manifest(m: dict) -> list[str]:
    """Problems of a manifest (beyond parsing), as messages: the structural ones every reader
    refuses, and what only verify checks."""
    problems = mf.structural_problems(m)
    if m.get("status") in mf.TERMINAL and m.get("status") != mf.CANCELLED and not m.get("finished_at"):
        problems.append("terminal run without finished_at")
    # Retention fields are not structural: readers treat a bad one conservatively (the run is
    # kept, spec/format.md "Retention"), so it hides nothing; verify still reports it.
    from .timefmt import parse_ts

    ret = m.get("retention") if isinstance(m.get("retention"), dict) else {}
    if ret.get("retain_until") is not None:
        try:
            parse_ts(ret["retain_until"])
        except (CasrunsError, TypeError, AttributeError):
            problems.append("retention.retain_until is not an RFC 3339 timestamp")
    if ret.get("retain_for") is not None and (isinstance(ret["retain_for"], bool) or not isinstance(ret["retain_for"], (int, float))):
        problems.append("retention.retain_for is not a number of seconds")
    if "promoted" in ret and not isinstance(ret["promoted"], bool):
        problems.append("retention.promoted is not a boolean")
    return problems


def verify(registry: "RegistryRoot", run_ids: list[str] | None = None, *, read_data: bool = False, quarantine: bool = False, progress=None) -> dict:
    from .tree import blob_refs

    store = registry.store
    everything = not run_ids
    strays: dict[str, dict] = {}  # path -> the stray (a path can be found twice: listed, and referenced)
    ids = run_entries(registry.runs_dir, None if everything else list(run_ids), strays)
    problems: list[dict] = []
    referenced: set[str] = set()
    checked: dict[str, str | None] = {}  # address -> problem kind or None (blobs shared by runs are read once)
    unchecked = 0  # manifests without a checksum (written by casruns 0.2 or older)
    seqs: dict[str, tuple[str, int]] = {}  # run id -> (incarnation, event_seq): checked against the journal
    from .runs import journal_of

    journal_end = journal_of(registry.runs_dir).end() if everything else 0  # before any manifest is read

    def check_blob(address: str, run_id: str, what: str) -> bool:
        if address not in checked:
            try:
                if read_data:
                    for _ in store.iter_chunks(address):
                        pass
                elif not store.contains(address):
                    raise BlobNotFound(f"blob {address} not found")
                checked[address] = None
            except BlobNotFound:
                checked[address] = "blob_missing"
                stray = store.loose_stray(address) if hasattr(store, "loose_stray") else None
                if stray is not None:
                    _add_blob_stray(strays, *stray)
            except IntegrityError:
                checked[address] = "blob_corrupt"
            except CasrunsError as e:  # not even an address (a damaged manifest)
                problems.append({"kind": "manifest_invalid", "run_id": run_id, "message": f"{what}: {e.message}"})
                return False
        kind = checked[address]
        if kind:
            problems.append({"kind": kind, "run_id": run_id, "address": address, "message": f"{what} blob {address} is {kind[5:]}"})
        return kind is None

    for i, rid in enumerate(ids):
        if progress:
            progress("verifying runs", i + 1, len(ids))
        run = registry.run_dir(rid)
        try:
            m, has_checksum = run.read_checked()  # the TOML, never the cache
        except CasrunsError as e:
            kind = "manifest_checksum" if e.details.get("reason") == "checksum" else "manifest_invalid"
            problems.append({"kind": kind, "run_id": rid, "message": e.message})
            continue
        if not has_checksum:
            unchecked += 1
        seqs[rid] = (m.get("incarnation", ""), int(m.get("event_seq") or 0))
        for p in check_manifest(m):
            problems.append({"kind": "manifest_invalid", "run_id": rid, "message": p})
        tree_errors: list = []
        for where, address in blob_refs(store, m, tree_errors, missing_tree_is_error=True):
            referenced.add(address)
            if where == "artifacts.tree":
                continue  # checked below, once blob_refs has read (and so verified) it
            check_blob(address, rid, f"log {where[5:]}" if where.startswith("logs.") else f"artifact {where[len('artifacts/'):]}")
        tree_ref = (m.get("artifacts") or {}).get("tree")
        for err in tree_errors:
            if err["code"] == "blob_not_found":
                problems.append({"kind": "blob_missing", "run_id": rid, "address": tree_ref, "message": f"artifact tree blob {tree_ref} is missing"})
            elif err["code"] == "integrity_error":
                checked[tree_ref] = "blob_corrupt"
                problems.append({"kind": "blob_corrupt", "run_id": rid, "address": tree_ref, "message": f"artifact tree blob {tree_ref} is corrupt"})
            else:
                problems.append({"kind": "tree_invalid", "run_id": rid, "address": tree_ref, "message": err["message"]})
        if tree_ref and not tree_errors:
            checked.setdefault(tree_ref, None)  # a verified read: counts as checked

    orphans = 0
    if everything:
        addresses = list(store.iter_addresses())
        for i, address in enumerate(addresses):
            if progress:
                progress("checking blobs", i + 1, len(addresses))
            if address not in referenced:
                orphans += 1
                if read_data and address not in checked:
                    check_blob(address, "", "unreferenced")

    if everything and hasattr(store, "iter_strays"):
        for rel, kind in store.iter_strays():
            _add_blob_stray(strays, rel, kind)

    if everything:
        problems.extend(check_journal(registry, seqs, journal_end, strays, progress))

    store.pack_names()  # a fresh look: packs whose index cannot be read
    bad_packs = dict(store.bad_packs)
    for name, why in sorted(bad_packs.items()):
        problems.append({"kind": "pack_corrupt", "run_id": "", "pack": name, "message": why})

    quarantined: list[str] = []
    quarantined_packs: list[str] = []
    if quarantine:
        qdir = os.path.join(registry.root, "quarantine")
        for address, kind in sorted(checked.items()):
            if kind == "blob_corrupt":
                fsutil.ensure_dir(qdir)
                if store.quarantine(address, qdir):  # a loose file moves; a packed frame is copied out
                    quarantined.append(address)
        for name in sorted(bad_packs):
            fsutil.ensure_dir(qdir)
            if store.pack_readable(name):
                continue  # replaced meanwhile by a good pack of the same content (names are hashes)
            if store.quarantine_pack(name, qdir):
                quarantined_packs.append(name)
        if quarantined or quarantined_packs:
            fsutil.fsync_dir(qdir)
    return {
        "schema": SCHEMA,
        "runs_checked": len(ids),
        "manifests_unchecked": unchecked,
        "blobs_checked": len(checked),
        "read_data": read_data,
        "orphans": orphans,
        "problems": problems,
        "quarantined": quarantined,
        "quarantined_packs": quarantined_packs,
        "strays": [strays[p] for p in sorted(strays)],
        "ok": not problems and not strays,
    }


def check_journal(registry: "RegistryRoot", seqs: dict[str, tuple[str, int]], end: int, strays: dict[str, dict], progress=None) -> list[dict]:
    """The event journal against the manifests (spec/events.md, "Guarantees"): every line whole
    and checksummed; no run with an event beyond its manifest's ``event_seq`` (reported but never
    committed); no run whose last journaled event is behind it with nothing pending.

    Writers run meanwhile: ``end`` is the journal's end taken before the manifests were read, so
    an event before it was appended before its run's manifest was read (it cannot be ahead of
    it); pending records are listed before the rest of the journal is read, so a change whose
    record is gone by then is in that rest."""
    from .errors import StrayFile
    from .runs import journal_of

    journal = journal_of(registry.runs_dir)
    starts = journal.segments()
    ahead: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], int] = {}
    pending: set[str] = set()
    problems: list[dict] = []
    try:
        position = first = starts[0] if starts else 0
        for i, (position, event) in enumerate(journal.read(position)):
            if progress and i % 10000 == 0 and end > first:
                progress("verifying events (bytes)", min(position, end) - first, end - first)
            key = (event.get("run_id"), event.get("incarnation", ""))
            seq = event.get("seq") or 0
            if position <= end:
                ahead[key] = max(ahead.get(key, 0), seq)
            else:
                break
            last[key] = max(last.get(key, 0), seq)
        pending = {name.split("+", 1)[0] for name in journal.pending_for()}
        for _, event in journal.read(min(position, end) if starts else 0):
            key = (event.get("run_id"), event.get("incarnation", ""))
            last[key] = max(last.get(key, 0), event.get("seq") or 0)
    except StrayFile as e:
        path = os.path.relpath(e.details.get("path") or journal.segments_dir, registry.root)
        strays.setdefault(path, {"path": path, "kind": "stray", "message": e.message})
        return problems
    except IntegrityError as e:
        return [{"kind": "event_journal_damaged", "run_id": "", "message": e.message}]
    for rid, (incarnation, seq) in sorted(seqs.items()):
        key = (rid, incarnation)
        if ahead.get(key, 0) > seq:
            problems.append({"kind": "event_ahead", "run_id": rid, "message": f"the journal reports seq {ahead[key]} for run {rid}, whose manifest has committed only {seq}"})
        elif key in last and last[key] < seq and rid not in pending:
            problems.append({"kind": "event_missing", "run_id": rid, "message": f"run {rid} committed change {seq} but the journal's last event for it is {last[key]}, and nothing is pending"})
    return problems


def run_entries(runs_dir: str, names: list[str] | None, strays: dict[str, dict]) -> list[str]:
    """The runs among ``names`` (None: every run-id-named entry of ``runs/``), sorted when
    listed; the strays among them go to ``strays`` instead (spec/format.md, "Strays"): an entry
    that is not a real directory (a file, a FIFO, a symlink), and a directory with no regular
    ``manifest.toml`` (none; a directory, FIFO or symlink by that name). Types come from
    lstat, so nothing is followed or opened. A named id with no entry stays (not found)."""
    if names is None:
        try:
            names = sorted(n for n in os.listdir(runs_dir) if not n.startswith(".") and is_run_id(n))
        except FileNotFoundError:
            names = []
    runs = []
    for rid in names:
        if not is_run_id(rid):
            runs.append(rid)  # refused, as before, when it is read
            continue
        stray = run_stray(runs_dir, rid)
        if stray is None:
            runs.append(rid)
        else:
            strays[stray["path"]] = stray
    return runs


def _add_blob_stray(strays: dict[str, dict], rel: str, kind: str) -> None:
    """A stray of the blob store (``rel`` relative to ``blobs/``)."""
    path = f"blobs/{rel}"
    want = "a regular file" if "/" in rel else "a directory"
    strays.setdefault(path, {"path": path, "kind": kind, "message": f"{path} is a {kind.replace('_', ' ')} where {want} should be; never read"})
