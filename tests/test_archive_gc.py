"""The fleet archive's retention and gc (issue 18, spec/archive-gc.md): each race of the protocol
staged on purpose, each crash window of gc stopped at its fault point, against a directory and
moto's S3 server on loopback."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from casruns import Registry
from casruns import archiveproto as proto
from casruns.archive import blob_key, manifest_key, open_remote
from conftest import cli

pytest.importorskip("s3fs")
from test_archive import KEYS, s3_server  # noqa: E402,F401 - the moto server fixture, shared

FAST = ["--set", "gc.lease=1s", "--set", "gc.grace=1s"]


@pytest.fixture(params=["dir", "s3"])
def dest(request, tmp_path, monkeypatch):
    if request.param == "dir":
        return str(tmp_path / "archive")
    endpoint = request.getfixturevalue("s3_server")
    for k, v in {**KEYS, "CASRUNS_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    bucket = f"gc-{os.urandom(4).hex()}"
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir(bucket)
    return f"s3://{bucket}/fleet"


def finished(reg: Registry, text: str, *, promote: bool = False, labels=None) -> str:
    script = f'echo {text}; mkdir -p "$CASRUNS_ARTIFACTS_DIR"; printf "{text}-artifact" > "$CASRUNS_ARTIFACTS_DIR/a.txt"'
    rid = reg.submit(["sh", "-c", script], labels=labels or {})["run_id"]
    reg.wait([rid], timeout=60)
    if promote:
        reg.promote(rid, reason="accepted")
    return rid


def blobs_of(reg: Registry, rid: str) -> set[str]:
    from casruns.archive import _run_blobs

    return set(_run_blobs(reg, reg.run_dir(rid).read_fresh()))


def archived_blobs(remote) -> set[str]:
    return {o.key[6:8] + o.key[9:] for o in remote.objects("blobs")}


def archived_runs(remote) -> set[str]:
    return set(remote.list_runs())


def gc_json(dest, *args, env=None, check=0) -> dict:
    proc = cli("archive", "gc", "--json", dest, *args, env=env)
    assert proc.returncode == check, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def configure(dest, *sets):
    proc = cli("archive", "config", "--json", dest, *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def assert_whole(reg: Registry, dest: str, rids) -> None:
    """Every named run is in the archive, reads back verified, and `verify --against` is clean."""
    report = reg.verify(list(rids), read_data=True, against=dest)
    assert report["ok"], report["problems"]
    for rid in rids:
        assert b"".join(reg.archive_log_chunks(dest, rid)) == b"".join(reg.log_chunks(rid, "stdout"))
        assert b"".join(reg.archive_cat(dest, rid, "a.txt")) == b"".join(reg.cat(rid, "a.txt"))


def gc_now(reg: Registry, dest: str, **kw) -> dict:
    """archive gc in this process (the CLI's JSON contract is checked by gc_json)."""
    return reg.archive_gc(dest, **kw)


def dangling(remote) -> list[tuple[str, str]]:
    """(run, blob) pairs where an archived manifest references a blob the archive lacks."""
    from casruns.archive import archived_tree, remote_manifest

    present = archived_blobs(remote)
    out = []
    for rid in remote.list_runs():
        m = remote_manifest(remote, rid)
        refs = {r["blake3"] for r in m["logs"].values() if r.get("blake3")}
        tree = (m.get("artifacts") or {}).get("tree")
        if tree:
            refs.add(tree)
            if tree in present:
                refs |= set(archived_tree(remote, m).addresses())
        out += [(rid, a) for a in sorted(refs - present)]
    return out


# ---- config ------------------------------------------------------------------------------


def test_archive_config_is_kept_in_the_archive_and_validated(registry, dest, validate):
    rid = finished(registry, "one", promote=True)
    assert cli("archive", "push", dest, rid).returncode == 0
    shown = validate(configure(dest), "reports.schema.json#/$defs/archive_config")
    assert shown["retention"] == {"promoted": None} and shown["grace"] == 3600 and shown["keep_last"] == {}
    got = validate(configure(dest, "--set", "retention.succeeded=30d", "--set", "retention.keep_last.suite=3",
                             "--set", "retention.promoted=400d", "--set", "gc.grace=2h"), "reports.schema.json#/$defs/archive_config")
    assert got["retention"] == {"succeeded": 30 * 86400, "promoted": 400 * 86400} and got["keep_last"] == {"suite": 3} and got["grace"] == 7200
    assert configure(dest)["retention"]["succeeded"] == 30 * 86400  # read back from the archive
    assert configure(dest, "--unset", "retention.promoted")["retention"]["promoted"] is None
    for bad, word in ((["--set", "retention.bogus=1d"], "not a terminal status"), (["--set", "retention.failed=soon"], "invalid duration"),
                      (["--set", "nonsense"], "KEY=VALUE"), (["--set", "gc.color=red"], "unknown setting"),
                      (["--set", "retention.keep_last.suite=x"], "whole number"), (["--set", "gc.lease=0s"], "at least 1s")):
        proc = cli("archive", "config", "--json", dest, *bad)
        err = json.loads(proc.stdout)["error"]
        assert proc.returncode == 3 and err["code"] == "invalid_input" and word in err["message"], err
    assert configure(dest)["retention"]["succeeded"] == 30 * 86400  # a refused edit changed nothing


# ---- expiry and sweep ----------------------------------------------------------------------


def test_gc_expires_by_the_archives_retention_and_keeps_promoted_and_keep_last(registry, dest, validate):
    kept = finished(registry, "kept", promote=True)
    old = [finished(registry, f"old{i}", labels={"suite": "s"}) for i in range(3)]
    assert cli("archive", "push", dest, kept, *old).returncode == 0
    remote = open_remote(dest, registry)
    before = archived_blobs(remote)

    # no config: nothing expires, nothing referenced is swept
    r = validate(gc_json(dest), "reports.schema.json#/$defs/archive_gc")
    assert r["runs_removed"] == [] and archived_runs(remote) == {kept, *old} and r["mark"]["state"] == "none"

    configure(dest, "--set", "retention.succeeded=1s", "--set", "retention.keep_last.suite=1", *FAST)
    time.sleep(1.1)
    dry = validate(gc_json(dest, "--dry-run"), "reports.schema.json#/$defs/archive_gc")
    assert {r["run_id"] for r in dry["runs_removed"]} == set(old[:2]) and dry["dry_run"]
    assert archived_blobs(remote) == before and archived_runs(remote) == {kept, *old}  # a dry run removes nothing
    gone = (blobs_of(registry, old[0]) | blobs_of(registry, old[1])) - blobs_of(registry, kept) - blobs_of(registry, old[2])
    assert dry["blobs_removed"] == len(gone)  # what the expired runs alone referenced

    r = validate(gc_json(dest, "--wait"), "reports.schema.json#/$defs/archive_gc")
    assert {x["run_id"] for x in r["runs_removed"]} == set(old[:2]) and all(x["rule"] == "status:succeeded" for x in r["runs_removed"])
    assert archived_runs(remote) == {kept, old[2]}  # keep_last.suite=1 keeps the newest of suite s
    assert gone and r["blobs_removed"] == len(gone) and r["mark"]["state"] == "swept"
    assert archived_blobs(remote) == before - gone
    assert dangling(remote) == []
    assert_whole(registry, dest, [kept, old[2]])

    rec = json.loads(remote.get_bytes(r["record"]))
    validate(rec, "reports.schema.json#/$defs/archive_gc_record")
    assert rec["state"] == "done" and sorted(rec["blobs_removed"]) == sorted(gone)
    assert rec["machine"]["registry_id"] == registry.registry_id

    # a promoted run goes by retention.promoted only, counted from its promotion
    configure(dest, "--set", "retention.promoted=1s")
    time.sleep(1.1)
    assert kept in {x["run_id"] for x in gc_json(dest)["runs_removed"]}


def test_gc_with_an_unreadable_manifest_sweeps_nothing(registry, dest):
    a, b = finished(registry, "a"), finished(registry, "b")
    assert cli("archive", "push", dest, a, b).returncode == 0
    remote = open_remote(dest, registry)
    remote.put_bytes(b"\x00not a manifest", manifest_key(b))
    remote.put_bytes(b"stray", blob_key("ab" * 32))  # a real candidate
    before = archived_blobs(remote)
    r = gc_json(dest, check=14)
    assert [u["run_id"] for u in r["runs_unreadable"]] == [b] and r["mark"]["state"] == "unreadable"
    assert archived_blobs(remote) == before  # what b references is unknown: nothing may go


# ---- the protocol's races, staged ----------------------------------------------------------


def test_a_push_during_the_grace_touches_a_marked_blob_and_the_sweep_spares_it(registry, dest):
    """Race 3: the blob is unreferenced at the mark; a later push relies on it (finds it present)."""
    a = finished(registry, "shared")
    assert cli("archive", "push", dest, a).returncode == 0
    remote = open_remote(dest, registry)
    configure(dest, "--set", "retention.succeeded=1s", *FAST)
    time.sleep(1.1)
    r = gc_json(dest)  # expires a: its blobs become candidates, the mark waits for the grace
    assert [x["run_id"] for x in r["runs_removed"]] == [a] and r["mark"]["state"] == "waiting"
    registry.promote(a, reason="wanted after all")  # now push it again, while the mark is open
    push = registry.archive_push(dest, [a])
    assert push["blobs_touched"] == len(blobs_of(registry, a)) and push["blobs_sent"] == 0
    time.sleep(1.1)
    r = gc_json(dest, "--wait")
    assert r["mark"]["state"] == "swept" and r["blobs_removed"] == 0 and r["blobs_spared"] == len(blobs_of(registry, a))
    assert dangling(remote) == [] and archived_runs(remote) == {a}
    assert_whole(registry, dest, [a])


def test_gc_waits_for_a_push_whose_lease_predates_the_mark(registry, dest):
    """Race 2: a push skipped a present, unreferenced blob before the mark existed; its manifest
    comes after the sweep would have listed manifests. gc must wait for that push's lease."""
    a = finished(registry, "twice")
    assert cli("archive", "push", dest, a).returncode == 0
    remote = open_remote(dest, registry)
    configure(dest, "--set", "retention.succeeded=1s", "--set", "gc.grace=0s", "--set", "gc.lease=1s")
    time.sleep(1.1)
    registry.promote(a, reason="keep")
    marks_read = threading.Event()
    release = threading.Event()
    real = proto.Marks.__init__

    def slow_marks(self, remote_):
        real(self, remote_)  # no mark yet: every blob is skipped as present
        marks_read.set()
        release.wait(20)  # the push stalls here, its lease being refreshed

    out = {}
    import unittest.mock as um

    with um.patch.object(proto.Marks, "__init__", slow_marks):
        t = threading.Thread(target=lambda: out.update(registry.archive_push(dest, [a])))
        t.start()
        assert marks_read.wait(20)
        # the run expires from the archive (its promotion is not pushed yet): its blobs are candidates
        r = gc_json(dest)
        assert [x["run_id"] for x in r["runs_removed"]] == [a]
        assert r["mark"]["state"] == "waiting" and r["mark"]["reason"] == "pushes" and len(r["mark"]["leases"]) == 1
        time.sleep(1.5)
        r = gc_json(dest)  # the lease is refreshed by the live push: still waiting, nothing deleted
        assert r["mark"]["state"] == "waiting" and r["mark"]["reason"] == "pushes" and r["blobs_removed"] == 0
        release.set()
        t.join(30)
    assert out["runs"] == 1
    r = gc_json(dest, "--wait")
    assert r["mark"]["state"] == "swept" and r["blobs_removed"] == 0
    assert dangling(remote) == [] and archived_runs(remote) == {a}
    assert_whole(registry, dest, [a])


def test_a_dead_pushers_lease_goes_stale_and_no_longer_holds_the_sweep(registry, dest):
    a = finished(registry, "lonely")
    assert cli("archive", "push", dest, a).returncode == 0
    remote = open_remote(dest, registry)
    remote.put_bytes(b"orphan", blob_key("cd" * 32))
    configure(dest, "--set", "gc.grace=0s", "--set", "gc.lease=1s")
    remote.put_bytes(proto.dump({"machine": "gone"}), f"{proto.LEASES}/deadhost-0000000000000000-dead.lease")
    r = gc_json(dest)
    assert r["mark"]["state"] == "waiting" and r["mark"]["reason"] == "pushes"
    time.sleep(3.2)  # three lease periods in the store's clock, never rewritten
    r = gc_json(dest)
    assert r["mark"]["state"] == "swept" and r["blobs_removed"] == 1
    assert "cd" * 32 not in archived_blobs(remote) and dangling(remote) == []


def test_a_push_that_touched_waits_out_a_sweep_in_progress_then_looks_again(registry, dest):
    """Race 10: the sweep listed the blob's old time, the push touched it after: the push must not
    write its manifest until the sweep ends, and then must find the blob (re-sending it if the
    sweep deleted it)."""
    a = finished(registry, "swept")
    assert cli("archive", "push", dest, a).returncode == 0
    remote = open_remote(dest, registry)
    wanted = sorted(blobs_of(registry, a))
    # an open mark listing the run's blobs, and a sweep of it in progress (being refreshed)
    remote.put_bytes(proto.dump({"candidates": wanted}), f"{proto.MARKS}/g1.json")
    remote.put_bytes(proto.dump({"leases": []}), f"{proto.MARKS}/g1.leases")
    sweep = proto.Refresher(remote, f"{proto.SWEEPS}/g1", {"gc_id": "g1"}, 0.5).start()
    remote.delete([manifest_key(a)])

    def finish_sweep():
        time.sleep(2.0)
        remote.delete([blob_key(x) for x in wanted])  # it deletes what it had listed as old...
        remote.delete([f"{proto.MARKS}/g1.json", f"{proto.MARKS}/g1.leases"])
        sweep.stop()  # ...and ends

    t = threading.Thread(target=finish_sweep)
    t.start()
    report = registry.archive_push(dest, [a])
    t.join()
    assert report["blobs_touched"] == len(wanted) and report["rechecks"] >= 1
    assert dangling(remote) == [] and archived_runs(remote) == {a}
    assert_whole(registry, dest, [a])


# ---- two machines, one run -----------------------------------------------------------------


def on_two_machines(registry, dest, tmp_path, text: str, *, theirs: str) -> tuple[str, Registry]:
    """A promoted run pushed from here, pulled by another machine, which unpromotes it."""
    a = finished(registry, text, promote=True)
    assert cli("archive", "push", dest, a).returncode == 0
    other = Registry(str(tmp_path / "other"))
    other.archive_pull(dest, [a])
    time.sleep(0.01)
    other.unpromote(a, reason=theirs, by="bob")
    return a, other


def test_concurrent_pushes_of_one_run_merge_and_never_lose_a_promotion(registry, dest, tmp_path):
    a, other = on_two_machines(registry, dest, tmp_path, "fleet", theirs="not needed")
    time.sleep(0.01)
    registry.unpromote(a, reason="superseded", by="alice")
    registry.promote(a, reason="needed again", by="alice")
    # the other machine pushes its older view after ours: the archive keeps both histories
    assert registry.archive_push(dest, [a])["runs"] == 1
    rep = other.archive_push(dest, [a])
    assert rep["manifests_merged"] == 1
    rec = json.loads(cli("archive", "status", "--json", dest, a).stdout)
    actions = [(h["action"], h.get("by")) for h in rec["retention"]["history"]]
    assert ("unpromote", "bob") in actions and ("promote", "alice") in actions and ("unpromote", "alice") in actions
    assert rec["retention"]["promoted"] is True  # the newest entry is alice's promotion
    assert_whole(registry, dest, [a])


def test_a_conditional_write_conflict_is_merged_again_not_overwritten(registry, dest, tmp_path):
    a, other = on_two_machines(registry, dest, tmp_path, "race", theirs="theirs")
    registry.unpromote(a, reason="ours", by="alice")
    remote_cls = type(open_remote(dest, registry))
    real = remote_cls.put_if
    sneaked = []

    def put_if(self, data, key, version):
        if key == manifest_key(a) and not sneaked:
            sneaked.append(1)  # another machine's push lands between our read and our write
            other.archive_push(dest, [a])
        return real(self, data, key, version)

    import unittest.mock as um

    with um.patch.object(remote_cls, "put_if", put_if):
        registry.archive_push(dest, [a])
    rec = json.loads(cli("archive", "status", "--json", dest, a).stdout)
    reasons = {h.get("reason") for h in rec["retention"]["history"]}
    assert {"theirs", "ours", "accepted"} <= reasons


# ---- a gc killed at each step ----------------------------------------------------------------


@pytest.mark.parametrize("point", ["archive_gc_after_lock", "archive_gc_mid_expire", "archive_gc_after_mark",
                                   "archive_gc_after_sweep_start", "archive_gc_mid_sweep", "archive_gc_after_sweep"])
def test_a_gc_killed_at_each_step_is_finished_by_the_next(registry, dest, point):
    keep = finished(registry, "keep", promote=True)
    old = [finished(registry, f"old{i}") for i in range(2)]
    assert cli("archive", "push", dest, keep, *old).returncode == 0
    remote = open_remote(dest, registry)
    configure(dest, "--set", "retention.succeeded=1s", "--set", "gc.grace=0s", "--set", "gc.lease=1s")
    time.sleep(1.1)
    proc = cli("archive", "gc", "--json", "--wait", dest, env={"CASRUNS_TEST_FAULT": f"{point}=kill"})
    assert proc.returncode == -9
    assert dangling(remote) == []  # whatever the kill left, no manifest lost a blob
    assert_whole(registry, dest, [keep])
    time.sleep(3.2)  # the dead gc's lock (and sweep object) go stale
    r = gc_now(registry, dest, wait=True)
    if r["mark"]["state"] != "swept":  # a mark discarded (its lease list never written): one more round
        r = gc_now(registry, dest, wait=True)
    assert archived_runs(remote) == {keep}
    assert archived_blobs(remote) == blobs_of(registry, keep)
    assert dangling(remote) == []
    assert_whole(registry, dest, [keep])
    leftovers = {o.key.split("/")[1] for o in remote.objects("gc") if not o.key.startswith("gc/records/")}
    assert leftovers <= {"lock"} and not remote.objects(proto.SWEEPS) and not remote.objects(proto.MARKS)


def test_a_second_gc_is_refused_while_one_runs_and_takes_over_a_stale_lock(registry, dest):
    a = finished(registry, "x")
    assert cli("archive", "push", dest, a).returncode == 0
    configure(dest, "--set", "gc.lease=1s")
    remote = open_remote(dest, registry)
    remote.put_bytes(proto.dump({"gc_id": "other", "machine": {"host": "elsewhere"}}), proto.LOCK)
    proc = cli("archive", "gc", "--json", dest)
    err = json.loads(proc.stdout)["error"]
    assert proc.returncode == 5 and err["code"] == "busy" and "elsewhere" in err["message"]
    time.sleep(3.2)
    assert gc_json(dest)["mark"]["state"] in ("none", "made")
    assert remote.stat(proto.LOCK) is None  # released at the end


@pytest.mark.parametrize("point", ["archive_push_after_lease", "archive_push_before_manifest"])
def test_a_push_killed_mid_protocol_leaves_a_lease_that_goes_stale(registry, dest, point):
    a, b = finished(registry, "p1"), finished(registry, "p2")
    configure_first = cli("archive", "push", dest, a)
    assert configure_first.returncode == 0
    configure(dest, "--set", "gc.grace=0s", "--set", "gc.lease=1s")
    proc = cli("archive", "push", dest, b, env={"CASRUNS_TEST_FAULT": f"{point}=kill"})
    assert proc.returncode == -9
    remote = open_remote(dest, registry)
    assert len(remote.objects(proto.LEASES)) == 1
    r = gc_json(dest)
    if point == "archive_push_before_manifest":  # b's blobs arrived, its manifest did not
        assert r["mark"]["reason"] == "pushes"
    time.sleep(3.2)
    gc_now(registry, dest, wait=True)
    assert archived_runs(remote) == {a} and archived_blobs(remote) == blobs_of(registry, a)
    assert registry.archive_push(dest, [b])["runs"] == 1  # the push resumed from scratch
    assert dangling(remote) == []
    assert_whole(registry, dest, [a, b])


def test_a_lock_naming_a_hostile_host_gives_one_clean_line(registry, tmp_path):
    dest = str(tmp_path / "archive")
    a = finished(registry, "x")
    assert cli("archive", "push", dest, a).returncode == 0
    remote = open_remote(dest, registry)
    remote.put_bytes(proto.dump({"gc_id": "g\x1b[2J", "machine": {"host": "evil\nhost\x07" + "x" * 500}}), proto.LOCK)
    proc = cli("archive", "gc", dest)
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1 and "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "evil?host?" in proc.stderr and len(proc.stderr) < 600
