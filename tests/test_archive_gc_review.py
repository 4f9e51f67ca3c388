"""Hostile review of the fleet archive's retention and gc (issue 18, spec/archive-gc.md).

Each test proved a defect a hostile review found (each was xfail until its fix landed); the fix
removed the mark. Directory archives unless S3 semantics matter."""

from __future__ import annotations

import json
import os
import time
import unittest.mock as um

import pytest

from casruns import Registry
from casruns import archiveproto as proto
from casruns.archive import manifest_key, open_remote
from conftest import cli

from test_archive_gc import archived_runs, dangling, finished


def conf(reg, dest, *sets):
    return reg.archive_config(dest, list(sets), [])


# ---- retention: what the archive's expiry must respect ----------------------------------------


def test_a_promoted_runs_own_retain_until_keeps_it_past_retention_promoted(registry, tmp_path):
    """spec: 'A run's own retain_for/retain_until can only keep it longer in an archive, never
    shorter.' A promoted run kept --until 2099 must outlive retention.promoted=1s."""
    dest = str(tmp_path / "archive")
    a = finished(registry, "keepme", promote=True)
    registry.retain(a, until="2099-01-01T00:00:00Z")
    registry.archive_push(dest, [a])
    conf(registry, dest, "retention.promoted=1s", "retention.succeeded=1s")
    time.sleep(1.2)
    r = registry.archive_gc(dest)
    assert r["runs_removed"] == [], r["runs_removed"]
    assert archived_runs(open_remote(dest, registry)) == {a}


def test_a_merge_never_drops_another_machines_retain_until(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "fleetkeep")
    registry.archive_push(dest, [a])
    other = Registry(str(tmp_path / "other"))
    other.archive_pull(dest, [a])
    # machine B (a pulled copy: its event_seq restarts low) keeps the run until 2099 and pushes that
    other.retain(a, until="2099-01-01T00:00:00Z")
    rep = other.archive_push(dest, [a])
    from casruns.archive import remote_manifest

    archived = remote_manifest(open_remote(dest, registry), a)
    conf(registry, dest, "retention.succeeded=1s")
    time.sleep(1.2)
    r = registry.archive_gc(dest)
    assert (archived.get("retention") or {}).get("retain_until"), (rep, archived.get("retention"))
    assert r["runs_removed"] == [] and archived_runs(open_remote(dest, registry)) == {a}


# ---- leases judged with another period than the one they are refreshed at ---------------------


def _stall_push_before_manifest(registry, dest, rid, out):
    """Run a push on a thread that stops (alive, its lease thread alive) right before it writes
    the manifest; returns (thread, reached, release)."""
    import threading

    from casruns import faults

    reached, release = threading.Event(), threading.Event()
    real = faults.point

    def point(name):
        if name == "archive_push_before_manifest":
            reached.set()
            release.wait(30)
        return real(name)

    patch = um.patch.object(faults, "point", point)
    patch.start()
    t = threading.Thread(target=lambda: out.update(registry.archive_push(dest, [rid])))
    t.start()
    assert reached.wait(30)
    return t, release, patch


def test_a_gc_after_gc_lease_is_shortened_never_sweeps_a_live_pushs_blobs(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "longlease")
    registry.archive_push(dest, [a])
    remote = open_remote(dest, registry)
    remote.delete([manifest_key(a)])  # its blobs stay, unreferenced (a run pushed, then expired, say)
    conf(registry, dest, "gc.lease=10m", "gc.grace=0s")
    out = {}
    # the push (lease period 10 min, rewritten every 10 min) skips every blob as present, no mark open
    t, release, patch = _stall_push_before_manifest(registry, dest, a, out)
    try:
        conf(registry, dest, "gc.lease=1s")  # an operator shortens the lease while the push runs
        time.sleep(3.3)  # 3 periods of the NEW lease; the push is 3 s into its 30 min stale limit
        first = registry.archive_gc(dest)  # makes the mark: the push's lease is live
        time.sleep(3.3)
        r = registry.archive_gc(dest)  # judged by the period the push declared, not the new setting
        assert r["mark"]["state"] == "waiting" and r["mark"]["reason"] == "pushes" and r["blobs_removed"] == 0, (first, r)
    finally:
        release.set()
        t.join(30)
        patch.stop()
    assert out.get("runs") == 1
    assert registry.archive_gc(dest, wait=True)["mark"]["state"] == "swept"
    assert dangling(remote) == [], "the manifest of a live push references blobs gc deleted"


# ---- the index: an entry must describe the manifest version it names --------------------------


def test_an_index_entry_never_names_a_version_it_was_not_written_for(registry, tmp_path):
    from casruns.remotes import LocalRemote

    dest = str(tmp_path / "archive")
    a = finished(registry, "indexrace")
    registry.archive_push(dest, [a])
    other = Registry(str(tmp_path / "other"))
    other.archive_pull(dest, [a])
    other.promote(a, reason="the release build", by="bob")
    registry.retain(a, for_="1s")  # machine A changes its copy too (no promotion on A)
    real = LocalRemote.put_if
    state = {"armed": True}

    def put_if(self, data, key, version):
        ok = real(self, data, key, version)
        if ok and key == manifest_key(a) and state["armed"]:
            state["armed"] = False  # B's push lands right after A's write, before A's stat
            other.archive_push(dest, [a])
        return ok

    with um.patch.object(LocalRemote, "put_if", put_if):
        registry.archive_push(dest, [a])
    from casruns.archive import remote_manifest

    remote = open_remote(dest, registry)
    assert remote_manifest(remote, a)["retention"]["promoted"] is True  # the archive's manifest says promoted
    listed = {r["run_id"]: r for r in registry.archive_list(dest)["runs"]}
    conf(registry, dest, "retention.succeeded=1s")  # retention.promoted unset: promoted runs are kept
    time.sleep(1.2)
    r = registry.archive_gc(dest)
    assert r["runs_removed"] == [] and archived_runs(remote) == {a}, "a promoted run's manifest was deleted"
    assert listed[a]["promoted"] is True, "archive list shows a promoted run as unpromoted"


# ---- bad input in the archive's gc/ objects -----------------------------------------------------


def test_a_malformed_mark_does_not_break_every_push(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "badmark")
    registry.archive_push(dest, [a])
    remote = open_remote(dest, registry)
    remote.delete([manifest_key(a)])
    remote.put_bytes(b'{"candidates": 5}\n', f"{proto.MARKS}/evil.json")
    remote.put_bytes(proto.dump({"leases": []}), f"{proto.MARKS}/evil.leases")
    proc = cli("archive", "push", "--json", dest, a)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert archived_runs(remote) == {a} and dangling(remote) == []


@pytest.mark.parametrize("which", ["leases", "candidates"])
def test_a_malformed_mark_or_lease_list_does_not_stop_every_gc(registry, tmp_path, which):
    dest = str(tmp_path / "archive")
    a = finished(registry, "badgc")
    registry.archive_push(dest, [a])
    remote = open_remote(dest, registry)
    conf(registry, dest, "gc.grace=0s", "gc.lease=1s")
    doc = {"leases": 5} if which == "leases" else {"leases": []}
    remote.put_bytes(json.dumps({"candidates": 5 if which == "candidates" else ["ab" * 32]}).encode(), f"{proto.MARKS}/evil.json")
    remote.put_bytes(json.dumps(doc).encode(), f"{proto.MARKS}/evil.leases")
    proc = cli("archive", "gc", "--json", dest)
    assert proc.returncode in (0, 14), proc.stdout + proc.stderr
    assert archived_runs(remote) == {a} and dangling(remote) == []


def test_a_stray_gc_lock_is_reported_not_busy_for_ever(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "straylock")
    registry.archive_push(dest, [a])
    os.makedirs(os.path.join(dest, "gc", "lock", "x"))
    proc = cli("archive", "gc", "--json", dest)
    err = json.loads(proc.stdout)["error"] if proc.returncode else {}
    assert proc.returncode == 0 or err.get("code") == "stray_file", proc.stdout
