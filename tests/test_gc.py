"""Promotion, retention, gc and verify: nothing referenced or promoted is ever lost."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from casruns import Registry, collect, gc as gcmod, locking, retention
from casruns import pins as pinsmod
from casruns import manifest as mf
from casruns.store import DiskStore
from conftest import casruns_exe, cli, cli_json, poll_until

T0 = "2026-01-01T00:00:00.000000Z"


def finished_run(reg: Registry, *, status="succeeded", files: dict | None = None, stdout=b"out\n", labels=None, retain_for=None, finished=None) -> str:
    """A terminal run with real blobs, made without a supervisor (fast and deterministic)."""
    rid = reg.submit(["true"], spawn=False, labels=labels or {}, retain_for=retain_for)["run_id"]
    run = reg.run_dir(rid)
    for name, data in (files or {}).items():
        p = Path(run.artifacts_dir) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    Path(run.spool("stdout")).write_bytes(stdout)
    with run.update() as m:
        mf.transition(m, "booting", T0)
    final = collect.finish(run, reg.store, status, exit_code=0 if status == "succeeded" else 1)
    if finished:
        with run.update() as m:
            m["finished_at"] = finished
    assert final["status"] == status
    return rid


def config(reg: Registry, text: str) -> None:
    Path(reg.root, "config.toml").write_text(text)
    reg._config = None


def make_old(reg: Registry) -> None:
    old = time.time() - 10 * 86400
    for a in reg.store.iter_loose_addresses():
        os.utime(reg.store.path_for(a), (old, old))
    for name in reg.store.pack_names():
        os.utime(reg.store.pack_path(name), (old, old))


def evidence(reg: Registry, rid: str) -> dict:
    out = {s: b"".join(reg.log_chunks(rid, s)) for s in ("stdout", "stderr", "transcript")}
    for e in reg.tree(rid).entries:
        out[e.path] = b"".join(reg.cat(rid, e.path))
    return out


# -- promotion ------------------------------------------------------------------------------------


def test_promote_and_unpromote_keep_history_and_are_idempotent(registry):
    rid = finished_run(registry)
    rec, outcome = registry.promote(rid, reason="accepted", by="homeboy")
    assert outcome == "promoted" and rec["retention"]["promoted"]
    assert rec["retention"]["promoted_by"] == "homeboy" and rec["retention"]["promotion_reason"] == "accepted"
    assert registry.promote(rid, reason="again")[1] == "already_promoted"
    rec, outcome = registry.unpromote(rid, reason="superseded")
    assert outcome == "unpromoted" and not rec["retention"]["promoted"]
    assert [h["action"] for h in rec["retention"]["history"]] == ["promote", "unpromote"]
    assert registry.unpromote(rid, reason="again")[1] == "not_promoted"


def test_promoting_an_active_run_is_refused(registry):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    proc, out = cli_json("promote", rid, "--reason", "too early")
    assert proc.returncode == 5 and out[0]["error"]["code"] == "invalid_transition"


def test_list_promoted_filters(registry, validate):
    a = finished_run(registry)
    b = finished_run(registry)
    registry.promote(a, reason="ok")
    _, out = cli_json("list", "--promoted")
    assert [r["run_id"] for r in validate(out[0], "list.schema.json")["runs"]] == [a]
    _, out = cli_json("list", "--not-promoted")
    assert [r["run_id"] for r in out[0]["runs"]] == [b]
    proc, out = cli_json("promote", b, "--reason", "fine")
    validate(out[0], "reports.schema.json#/$defs/promotion")


# -- retention ------------------------------------------------------------------------------------


def test_retention_rules_per_status_override_and_until(registry):
    config(registry, '[retention]\nsucceeded = "30d"\nfailed = "1d"\n')
    ok = finished_run(registry, finished="2026-11-20T00:00:00.000000Z")
    bad = finished_run(registry, status="failed", finished="2026-11-20T00:00:00.000000Z")
    short = finished_run(registry, retain_for="1s", finished="2026-11-20T00:00:00.000000Z")
    for rid in (ok, bad, short):  # a gc saw them finished 10 days ago (tests/test_faults_gc.py: the hold)
        retention.write_sighting(registry.run_dir(rid).path, time.time() - 10 * 86400, (None, None))
    r_ok, r_bad, r_short = (registry.get(x)["retention"] for x in (ok, bad, short))
    assert r_ok["rule"] == "status:succeeded" and r_ok["retain_until"] == "2026-12-20T00:00:00.000000Z"
    assert not r_ok["cleanup_eligible"]
    assert r_bad["rule"] == "status:failed" and r_bad["cleanup_eligible"]
    assert r_short["rule"] == "retain_for" and r_short["cleanup_eligible"]
    rec = registry.retain(bad, until="2099-01-01T00:00:00Z")
    assert rec["retention"]["rule"] == "retain_until" and not rec["retention"]["cleanup_eligible"]
    proc, out = cli_json("retain", ok, "--for", "1s")
    assert out[0]["retention"]["rule"] == "retain_for" and out[0]["retention"]["cleanup_eligible"]
    proc, out = cli_json("retain", ok)
    assert proc.returncode == 3


def test_promoted_and_active_runs_are_never_eligible(registry):
    config(registry, '[retention]\nsucceeded = "0s"\n')
    rid = finished_run(registry)
    assert registry.get(rid)["retention"]["cleanup_eligible"]
    registry.promote(rid, reason="keep")
    ret = registry.get(rid)["retention"]
    assert not ret["cleanup_eligible"] and ret["rule"] == "promoted" and ret["cleanup_eligible_at"] is None
    active = registry.submit(["true"], spawn=False)["run_id"]
    assert registry.get(active, reap=False)["retention"]["rule"] == "active"


def test_keep_last_n_per_label_value(registry):
    config(registry, '[retention]\nsucceeded = "0s"\n[retention.keep_last]\nsuite = 2\n')
    unit = [finished_run(registry, labels={"suite": "unit"}, finished=f"2026-01-0{i + 1}T00:00:00.000000Z") for i in range(4)]
    e2e = [finished_run(registry, labels={"suite": "e2e"}, finished=f"2026-01-0{i + 1}T00:00:00.000000Z") for i in range(1)]
    other = finished_run(registry)
    kept = {rid for rid in unit + e2e + [other] if not registry.get(rid)["retention"]["cleanup_eligible"]}
    assert kept == {unit[3], unit[2], e2e[0]}
    assert registry.get(unit[3])["retention"]["rule"] == "keep_last:suite"
    listed = {r["run_id"]: r["retention"]["cleanup_eligible"] for r in registry.list()}
    assert {k for k, v in listed.items() if not v} == kept
    report = registry.gc()
    assert report["runs_removed"] == 3
    assert {r["run_id"] for r in registry.list()} == kept


# -- gc ---------------------------------------------------------------------------------------------


def tree_snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts}


def test_gc_removes_eligible_runs_and_their_unshared_blobs_only(registry, validate):
    config(registry, '[retention]\nsucceeded = "0s"\n')
    keep = finished_run(registry, files={"shared.txt": b"shared", "mine.txt": b"keep me"}, stdout=b"keep\n")
    registry.promote(keep, reason="evidence")
    gone = finished_run(registry, files={"shared.txt": b"shared", "other.txt": b"gone"}, stdout=b"gone\n")
    before = evidence(registry, keep)
    make_old(registry)
    proc, out = cli_json("gc")
    report = validate(out[0], "reports.schema.json#/$defs/gc")
    assert report["runs_removed"] == 1 and report["blobs_removed"] >= 2
    assert not registry.run_dir(gone).exists()
    assert evidence(registry, keep) == before
    proc, out = cli_json("verify", "--read-data")
    assert proc.returncode == 0 and validate(out[0], "reports.schema.json#/$defs/verify")["orphans"] == 0


def test_dry_run_changes_nothing(registry):
    config(registry, '[retention]\nsucceeded = "0s"\n')
    finished_run(registry, files={"a": b"a"})
    finished_run(registry, files={"b": b"b"})
    make_old(registry)
    before = tree_snapshot(Path(registry.root))
    proc, out = cli_json("gc", "--dry-run")
    assert out[0]["dry_run"] and out[0]["runs_removed"] == 2 and out[0]["blobs_removed"] > 0
    assert tree_snapshot(Path(registry.root)) == before


def test_gc_keeps_young_unreferenced_blobs_and_future_mtimes(registry):
    young = registry.store.put_bytes(b"just written, not yet referenced")
    future = registry.store.put_bytes(b"clock jumped backwards")
    t = time.time() + 86400
    os.utime(registry.store.path_for(future.address), (t, t))
    old = registry.store.put_bytes(b"old garbage")
    o = time.time() - 86400
    os.utime(registry.store.path_for(old.address), (o, o))
    report = registry.gc()
    assert registry.store.contains(young.address) and registry.store.contains(future.address)
    assert not registry.store.contains(old.address)
    assert report["blobs_in_grace"] == 2


def test_pinned_dedup_hit_survives_a_sweep_with_no_grace(registry):
    """The writer pins, then finds the blob present (a dedup hit) just as gc sweeps."""
    config(registry, 'gc_grace = "0s"\n')
    data = b"evidence a concurrent writer is about to reference"
    info = registry.store.put_bytes(data)  # unreferenced, and old enough for any grace
    pin = registry.store.pin()
    batch = registry.store.batch(pin)
    assert batch.put_bytes(data).existed  # pinned first, then found present
    registry.gc()
    assert registry.store.contains(info.address)
    batch.sync()
    pin.release()  # settled: the next gc's mark must see a manifest, or it is garbage
    registry.gc()
    assert not registry.store.contains(info.address)


def test_reference_committed_after_the_mark_is_kept(registry, monkeypatch):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "100d"\n')
    content = b"artifact shared with a run that finishes during gc"
    registry.store.put_bytes(content)
    late = {}

    def writer_finishes(point):
        if point == "after_mark":  # a run ingests (dedup hit) and commits after the mark
            late["rid"] = finished_run(registry, files={"late.txt": content})

    monkeypatch.setattr(gcmod, "_fault", writer_finishes)
    registry.gc()
    assert evidence(registry, late["rid"])["late.txt"] == content
    monkeypatch.undo()
    registry.gc()  # the next gc sees the manifest
    assert evidence(registry, late["rid"])["late.txt"] == content
    assert registry.verify(read_data=True)["ok"]


def test_in_flight_temp_files_are_not_collected(registry):
    tmp = Path(registry.store.tmp_dir)
    tmp.mkdir(exist_ok=True)
    old = time.time() - 86400
    alive = tmp / f"{os.getpid()}-aaaa.tmp"  # a writer that is still running
    dead = tmp / "999999999-bbbb.tmp"  # a writer that died
    fresh_dead = tmp / "999999998-cccc.tmp"
    for p in (alive, dead, fresh_dead):
        p.write_bytes(b"partial")
    for p in (alive, dead):
        os.utime(p, (old, old))
    report = registry.gc()
    assert alive.exists() and fresh_dead.exists() and not dead.exists()
    assert report["temps_removed"] >= 1


def test_live_writer_pin_is_never_judged_stale(registry):
    config(registry, 'gc_grace = "0s"\n')
    info = registry.store.put_bytes(b"a long ingest's blob")
    pin = registry.store.pin()
    pin.add(info.address)
    old = time.time() - 30 * 86400
    os.utime(pin.path, (old, old))  # however old its file looks, its flock is held
    registry.gc()
    assert registry.store.contains(info.address) and os.path.exists(pin.path)
    pin.release()


def test_two_gcs_at_once(registry, casruns_home):
    lock = locking.FileLock(os.path.join(registry.root, "locks", "gc.lock"), record=True)
    lock.acquire()
    try:
        proc, out = cli_json("gc")
        assert proc.returncode == 5 and out[0]["error"]["code"] == "busy"
        assert str(os.getpid()) in out[0]["error"]["message"]
        waiter = subprocess.Popen(casruns_exe() + ["gc", "--wait", "--json"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting for us
    finally:
        lock.release()
    assert waiter.wait(timeout=30) == 0
    assert json.loads(waiter.stdout.read())["schema"] == "casruns/gc/v1"


GC_KILL_POINTS = ["after_trash", "after_run_rename", "after_runs_removed", "after_mark", "after_first_delete"]


@pytest.mark.parametrize("point", GC_KILL_POINTS)
def test_gc_killed_at_any_point_leaves_a_consistent_registry(registry, point):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    promoted = finished_run(registry, files={"report.xml": b"<ok/>", "shared": b"s"}, stdout=b"promoted\n")
    registry.promote(promoted, reason="evidence")
    for i in range(4):
        finished_run(registry, files={"shared": b"s", f"own{i}": f"own {i}".encode()}, stdout=f"run {i}\n".encode())
    os.makedirs(os.path.join(registry.runs_dir, ".trash-leftover-0000"))
    before = evidence(registry, promoted)
    proc = cli("gc", env={"CASRUNS_TEST_FAULT": "gc_" + point})
    assert proc.returncode == -9, proc.stderr
    proc, out = cli_json("verify", "--read-data")
    assert proc.returncode == 0, out
    assert evidence(registry, promoted) == before
    cli("gc", check=0)
    proc, out = cli_json("verify", "--read-data")
    assert proc.returncode == 0 and out[0]["orphans"] == 0
    assert [r["run_id"] for r in registry.list()] == [promoted]
    assert not [n for n in os.listdir(registry.runs_dir) if n.startswith(".trash-")]


# -- verify -----------------------------------------------------------------------------------------


def test_verify_reports_missing_corrupt_and_orphans_and_quarantines(registry, validate):
    rid = finished_run(registry, files={"a.txt": b"aaaa" * 100, "b.txt": b"bbbb" * 100})
    tree = registry.tree(rid)
    a = tree.get("a.txt").blake3
    b = tree.get("b.txt").blake3
    os.unlink(registry.store.path_for(a))
    pb = registry.store.path_for(b)
    raw = bytearray(pb.read_bytes())
    raw[-3] ^= 0xFF
    pb.write_bytes(bytes(raw))
    orphan = registry.store.put_bytes(b"nobody references me")
    proc, out = cli_json("verify")
    rep = validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14
    assert {(p["kind"], p["address"]) for p in rep["problems"]} == {("blob_missing", a)}
    assert rep["orphans"] == 1
    proc, out = cli_json("verify", "--read-data", "--quarantine")
    kinds = {(p["kind"], p["address"]) for p in out[0]["problems"]}
    assert ("blob_corrupt", b) in kinds and ("blob_missing", a) in kinds
    assert out[0]["quarantined"] == [b]
    assert (Path(registry.root) / "quarantine" / b).exists() and not pb.exists()
    assert registry.store.contains(orphan.address)
    proc, out = cli_json("verify", rid)
    assert out[0]["runs_checked"] == 1 and out[0]["orphans"] == 0


def test_verify_reports_a_broken_manifest(registry):
    rid = finished_run(registry)
    p = registry.run_dir(rid).manifest_path
    with open(p, "ab") as f:  # damage, as a disk might
        f.write(b"\n[[[")
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and out[0]["problems"][0]["kind"] == "manifest_invalid"


def test_gc_reads_a_pin_settled_between_its_listing_and_its_read(tmp_path, monkeypatch):
    """Found by the stress test: a writer settles its pin (rename *.pin -> *.done) without the
    sweep lock, so gc may list it as *.pin and find only *.done when it opens it. Skipping it
    let gc delete the blobs of a manifest committed after the mark."""
    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "42-abcd.done").write_text("a" * 64 + "\n" + "b" * 64 + "\n")
    monkeypatch.setattr(pinsmod, "pin_files", lambda d: [str(pins / "42-abcd.pin")])  # the listing
    assert pinsmod.read_pins(pins, skip=set()) == {"a" * 64, "b" * 64}


# -- the stress test ------------------------------------------------------------------------------


def _ingest_loop(root, n, seed, q, packed=False):
    reg = Registry(root)
    made = []
    for i in range(n):
        shared = {"shared.bin": b"S" * 5000, f"pair{i % 3}.txt": f"pair {i % 3}".encode(), f"own-{seed}-{i}": os.urandom(64)}
        if packed:
            # A pack per run. lib/ changes every 4th run, so the first run of a group packs it and
            # the next ones (of any writer) dedup against that pack, which gc deletes, rewrites or
            # merges meanwhile once its run is gone.
            shared.update({f"lib/{k}.txt": f"library file {k} v{i // 4}\n".encode() * 30 for k in range(10)})
            shared.update({f"own/{k}": os.urandom(200) for k in range(10)})
        # even runs are kept (retained, then promoted); odd ones are gc fodder at once
        keep = i % 2 == 0
        rid = finished_run(reg, files=shared, stdout=f"stress {seed} {i}\n".encode(), retain_for="1h" if keep else None)
        if keep:
            reg.promote(rid, reason="stress")
        made.append(rid)
    q.put(made)


def _gc_loop(root, stop_file, q):
    reg = Registry(root)
    rounds = 0
    while not os.path.exists(stop_file) and rounds < 400:
        reg._config = None
        reg.gc(wait=True)
        rounds += 1
    q.put(rounds)


@pytest.mark.parametrize("layout", ["loose", "packed"])
def test_stress_concurrent_ingests_and_gc_loops_lose_nothing(registry, tmp_path, layout):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\nfailed = "0s"\n')
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    stop = str(tmp_path / "stop")
    gcs = [ctx.Process(target=_gc_loop, args=(registry.root, stop, q)) for _ in range(2)]
    writers = [ctx.Process(target=_ingest_loop, args=(registry.root, 20, s, q, layout == "packed")) for s in range(3)]
    for p in gcs + writers:
        p.start()
    results = []
    for p in writers:
        p.join(timeout=240)
        assert p.exitcode == 0
    Path(stop).write_text("")
    for p in gcs:
        p.join(timeout=120)
        assert p.exitcode == 0
    while not q.empty():
        results.append(q.get())
    made = [rid for r in results if isinstance(r, list) for rid in r]
    rounds = [r for r in results if isinstance(r, int)]
    assert len(made) == 60 and sum(rounds) > 2
    report = registry.verify(read_data=True)
    assert report["ok"], report["problems"][:5]
    survivors = {r["run_id"] for r in registry.list()}
    for rid in survivors:
        ev = evidence(registry, rid)
        assert ev["shared.bin"] == b"S" * 5000 and ev["stdout"].startswith(b"stress ")
        if layout == "packed":
            assert ev["lib/7.txt"].startswith(b"library file 7 v") and len(ev["own/9"]) == 200
    promoted = {r["run_id"] for r in registry.list(promoted=True)}
    assert len(promoted) == 30 and promoted <= survivors
    registry.gc()
    assert {r["run_id"] for r in registry.list()} == promoted  # the rest were eligible
    assert registry.verify(read_data=True)["ok"]


def _on_a_terminal(args, env_home):
    """Run the CLI with stderr on a pseudo-terminal; return (exit code, what the terminal got)."""
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, CASRUNS_HOME=str(env_home))
    proc = subprocess.Popen(casruns_exe() + args, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            seen += data
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return proc.returncode, seen.decode(errors="replace")


@pytest.mark.parametrize("command", [["gc"], ["verify"], ["scan"], ["archive", "push", "ARCH", "--promoted"]])
def test_long_operations_show_progress_only_on_a_terminal(registry, command, tmp_path):
    rid = finished_run(registry, files={"a": b"a"})
    registry.promote(rid, reason="x")
    args = [str(tmp_path / "arch") if a == "ARCH" else a for a in command]
    code, tty = _on_a_terminal(args, registry.root)
    assert code == 0 and f"/1" in tty  # "phase: 1/1"
    code, tty = _on_a_terminal(args[:1] + (["--json"] if args[0] != "archive" else [args[1], "--json"]) + args[1 if args[0] != "archive" else 2 :], registry.root)
    assert code == 0 and tty == ""
    proc = cli(*args)  # not a terminal: stderr stays quiet
    assert proc.returncode == 0 and proc.stderr == ""
