"""gc under damage, strays and skewed clocks (issue 13): it never turns repairable damage into loss.

* a reference to a missing blob (a flipped hex digit, a lost tree or file) stops the sweep: the
  blob meant may be any unreferenced one;
* retention trusts no single clock: a run is removed only once gc itself has seen it terminal for
  the rule's time, measured within a boot by the boot clock (which no wall-clock jump moves);
* strays in ``runs/`` are reported and skipped, and a FIFO never blocks gc;
* a blob, pack or temp file whose mtime is far in the future is collected eventually.

Clocks are skewed in-process by replacing ``time.time`` (what a gc with a wrong clock sees) and
``retention.boot_clock`` (the boot id and time since boot).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from casruns import Registry, retention
from conftest import casruns_exe, cli, cli_json
from test_gc import config, evidence, finished_run, make_old

DAY = 86400.0
REAL_TIME = time.time


def skew(monkeypatch, seconds: float, boot: tuple[str, float] | None = None) -> None:
    """Make this process' wall clock ``seconds`` off; ``boot``: the (boot id, time since boot)
    the boot clock reports (by default the real one, which a wall-clock change does not move)."""
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + seconds)
    if boot is not None:
        monkeypatch.setattr(retention, "boot_clock", lambda: boot, raising=False)


def ago(seconds: float) -> str:
    return retention.format_ts(REAL_TIME() - seconds)


def seen_file(reg: Registry, rid: str) -> Path:
    return Path(reg.run_dir(rid).path) / "gc-seen.json"


# -- item 3: a reference to a missing blob stops the sweep ----------------------------------------


def test_gc_keeps_the_blob_a_damaged_log_reference_meant(registry, validate):
    """One hex digit of a log reference flipped: verify reports blob_missing; gc used to delete
    the real log blob (now unreferenced), turning a repairable manifest into a lost log."""
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "30d"\n')
    rid = finished_run(registry, stdout=b"the only copy of this log\n")
    run = registry.run_dir(rid)
    good = run.read()["logs"]["stdout"]["blake3"]
    bad = ("1" if good[0] != "1" else "2") + good[1:]
    with run.update() as m:
        m["logs"]["stdout"]["blake3"] = bad
    make_old(registry)
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and ("blob_missing", bad) in {(p["kind"], p.get("address")) for p in out[0]["problems"]}

    proc, out = cli_json("gc")
    report = validate(out[0], "reports.schema.json#/$defs/gc")
    assert registry.store.contains(good), "gc deleted the blob the damaged reference meant"
    assert proc.returncode == 14 and not report["swept"] and report["blobs_removed"] == 0
    assert report["blobs_missing"] == 1 and report["missing"] == [{"run_id": rid, "address": bad, "where": "logs.stdout"}]
    proc = cli("gc")  # people get the references and the reason on stdout
    assert proc.returncode == 14 and f"blob_missing: {rid}: logs.stdout {bad}" in proc.stdout and "nothing swept" in proc.stdout

    with run.update() as m:  # the operator repairs the reference: gc sweeps again
        m["logs"]["stdout"]["blake3"] = good
    garbage = registry.store.put_bytes(b"real garbage")
    make_old(registry)
    report = registry.gc()
    assert report["swept"] and report["blobs_removed"] == 1 and not registry.store.contains(garbage.address)
    assert evidence(registry, rid)["stdout"] == b"the only copy of this log\n"


def test_a_missing_tree_or_artifact_file_stops_the_sweep_and_removing_the_run_resumes_it(registry, validate):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "30d"\n')
    lost_file = finished_run(registry, files={"a.txt": b"a" * 100, "b.txt": b"b" * 100})
    lost_tree = finished_run(registry, files={"c.txt": b"c" * 100})
    a = registry.tree(lost_file).get("a.txt").blake3
    tree = registry.run_dir(lost_tree).read()["artifacts"]["tree"]
    orphan = registry.store.put_bytes(b"maybe what a damaged reference meant")
    os.unlink(registry.store.path_for(a))  # a loose artifact blob, lost
    make_old(registry)
    report = validate(registry.gc(), "reports.schema.json#/$defs/gc")
    assert registry.store.contains(orphan.address), "gc swept although a referenced blob is missing"
    assert not report["swept"] and report["missing"] == [{"run_id": lost_file, "address": a, "where": "artifacts/a.txt"}]

    os.unlink(registry.store.path_for(tree))  # a lost tree: the files it lists are unknown
    report = validate(registry.gc(), "reports.schema.json#/$defs/gc")
    assert registry.store.contains(orphan.address)
    assert not report["swept"] and report["blobs_removed"] == 0 and report["blobs_missing"] == 2
    assert sorted((m["run_id"], m["where"], m["address"]) for m in report["missing"]) == sorted(
        [(lost_file, "artifacts/a.txt", a), (lost_tree, "artifacts.tree", tree)]
    )
    dry = registry.gc(dry_run=True)
    assert not dry["swept"] and dry["blobs_missing"] == 2

    # Removing runs is still allowed; once no remaining run references a missing blob, gc sweeps.
    for rid in (lost_file, lost_tree):
        registry.retain(rid, for_="0s")
    report = registry.gc()
    assert report["runs_removed"] == 2 and report["swept"] and report["blobs_missing"] == 0
    assert not registry.store.contains(orphan.address)
    assert registry.verify(read_data=True)["ok"]


# -- item 5: retention trusts no single clock -------------------------------------------------------


def test_a_supervisor_clock_behind_does_not_make_a_run_eligible_as_it_finishes(registry, monkeypatch):
    """finished_at 30 days in the past (the supervisor's clock was 30 days behind): the run
    used to be deleted by the next gc. Now it is kept 7 days from gc's first sighting."""
    config(registry, '[retention]\nsucceeded = "7d"\n')
    rid = finished_run(registry, finished=ago(30 * DAY))
    rec = registry.get(rid)["retention"]
    assert not rec["cleanup_eligible"], "status says a run that just finished may be deleted"
    report = registry.gc()
    assert registry.run_dir(rid).exists(), "gc deleted a run that finished a moment ago"
    assert report["runs_removed"] == 0 and report["runs_first_seen"] == 1 and seen_file(registry, rid).is_file()

    # Elapsed time is gc's own: 6 days on, by both clocks, still kept; 7 days on, removed.
    seen = json.loads(seen_file(registry, rid).read_text())
    assert seen["schema"] == "casruns/gc-seen/v1" and seen["boot_id"] == retention.boot_clock()[0] and seen["boottime"] is not None
    skew(monkeypatch, 6 * DAY, (seen["boot_id"], seen["boottime"] + 6 * DAY))
    assert not registry.get(rid)["retention"]["cleanup_eligible"]
    assert registry.gc()["runs_removed"] == 0
    skew(monkeypatch, 7 * DAY + 60, (seen["boot_id"], seen["boottime"] + 7 * DAY + 60))
    assert registry.get(rid)["retention"]["cleanup_eligible"]  # status agrees with what gc does next
    assert registry.gc()["runs_removed"] == 1 and not registry.run_dir(rid).exists()


def test_a_gc_clock_ahead_does_not_delete_a_run_finished_a_second_earlier(registry, monkeypatch):
    config(registry, '[retention]\nsucceeded = "7d"\n')
    rid = finished_run(registry)
    skew(monkeypatch, 30 * DAY)  # gc's wall clock 30 days ahead; the boot clock is not
    report = registry.gc()
    assert registry.run_dir(rid).exists(), "a gc with its clock 30 days ahead deleted a run finished a second ago"
    assert report["runs_first_seen"] == 1
    assert registry.gc()["runs_removed"] == 0  # the same clock, a moment later
    # The clock is put right: the sighting is in the future, so it counts for nothing, and this
    # gc's clock is behind the previous gc's, so it stamps nothing either: the run stays.
    monkeypatch.undo()
    report = registry.gc()
    assert report["runs_removed"] == 0 and report["runs_first_seen"] == 0
    assert not registry.get(rid)["retention"]["cleanup_eligible"]
    # A sighting in the future, made by a clock ahead, is made again by a gc whose clock is not
    # behind the previous gc's (here: the previous gc's record is gone).
    Path(registry.root, "locks", "gc.lock").write_text("{}")
    report = registry.gc()
    assert report["runs_removed"] == 0 and report["runs_first_seen"] == 1
    assert abs(retention.read_sighting(registry.run_dir(rid).path).seen_at - REAL_TIME()) < 60


def test_a_clock_jump_after_the_first_sighting_is_measured_by_the_boot_clock(registry, monkeypatch):
    """Seen by a gc with a right clock; then the wall clock jumps 30 days ahead in the same boot.
    The boot clock says a minute passed, so the run stays. After a reboot only the wall clock is
    left to trust (spec/format.md, "Whose clock")."""
    config(registry, '[retention]\nsucceeded = "7d"\n')
    rid = finished_run(registry)
    skew(monkeypatch, 0, ("boot-1", 1000.0))
    registry.gc()
    skew(monkeypatch, 30 * DAY, ("boot-1", 1060.0))
    assert not registry.get(rid)["retention"]["cleanup_eligible"]
    assert registry.gc()["runs_removed"] == 0 and registry.run_dir(rid).exists()
    skew(monkeypatch, 30 * DAY, ("boot-2", 50.0))
    assert registry.gc()["runs_removed"] == 1


def test_status_and_dry_run_never_write_and_report_what_gc_does(registry, monkeypatch):
    config(registry, '[retention]\nsucceeded = "1d"\n')
    rid = finished_run(registry, finished=ago(10 * DAY))
    proc, out = cli_json("status", rid)
    assert not out[0]["retention"]["cleanup_eligible"] and not seen_file(registry, rid).exists()
    report = registry.gc(dry_run=True)
    assert report["runs_removed"] == 0 and report["runs_first_seen"] == 0 and not seen_file(registry, rid).exists()
    registry.gc()
    seen = retention.read_sighting(registry.run_dir(rid).path)
    proc, out = cli_json("status", rid)
    at = retention.parse_ts(out[0]["retention"]["cleanup_eligible_at"])
    assert not out[0]["retention"]["cleanup_eligible"] and abs(at - (seen.seen_at + DAY)) < 5
    skew(monkeypatch, DAY + 5, (seen.boot_id, seen.boottime + DAY + 5))
    assert registry.get(rid)["retention"]["cleanup_eligible"]
    assert registry.gc(dry_run=True)["runs_removed"] == 1 and registry.run_dir(rid).exists()
    assert registry.gc()["runs_removed"] == 1


def test_a_zero_hold_and_retain_until_need_no_earlier_sighting(registry):
    config(registry, '[retention]\nsucceeded = "0s"\n')
    now = finished_run(registry)
    until = finished_run(registry, retain_for="30d")
    registry.retain(until, until=ago(60))
    assert registry.get(now)["retention"]["cleanup_eligible"] and registry.get(until)["retention"]["cleanup_eligible"]
    assert registry.gc()["runs_removed"] == 2


def test_gc_killed_after_recording_sightings_loses_nothing_and_keeps_them(registry):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "7d"\nfailed = "0s"\n')
    held = finished_run(registry, files={"h.txt": b"held"})
    gone = finished_run(registry, status="failed", files={"g.txt": b"gone"})
    before = evidence(registry, held)
    make_old(registry)
    proc = cli("gc", env={"CASRUNS_TEST_FAULT": "gc_after_sightings"})
    assert proc.returncode == -9, proc.stderr
    assert seen_file(registry, held).is_file() and registry.run_dir(gone).exists()
    assert registry.verify(read_data=True)["ok"]
    report = registry.gc()
    assert report["runs_first_seen"] == 0 and report["runs_removed"] == 1 and evidence(registry, held) == before
    assert registry.verify(read_data=True)["ok"]


@pytest.mark.parametrize("offset", [-400 * DAY, -30 * DAY, 30 * DAY, 400 * DAY])
def test_live_and_promoted_runs_survive_every_clock_skew(registry, monkeypatch, offset):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\nfailed = "0s"\n')
    promoted = finished_run(registry, files={"keep.txt": b"evidence"})
    registry.promote(promoted, reason="evidence")
    queued = registry.submit(["true"], spawn=False)["run_id"]
    before = evidence(registry, promoted)
    skew(monkeypatch, offset)
    registry.gc()
    registry.gc()
    monkeypatch.undo()
    registry.gc()
    assert registry.run_dir(queued).exists() and evidence(registry, promoted) == before
    assert registry.verify(read_data=True)["ok"]


# -- item 8: strays are reported, never a reason to stop ----------------------------------------------


def test_strays_in_runs_are_reported_and_gc_goes_on_without_blocking_on_a_fifo(registry, validate):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    kept = finished_run(registry, files={"k.txt": b"kept"})
    registry.promote(kept, reason="evidence")
    gone = finished_run(registry, files={"g.txt": b"garbage once its run is gone"})
    cached = finished_run(registry, files={"c.txt": b"read from its TOML"})
    registry.promote(cached, reason="evidence")
    runs = Path(registry.runs_dir)
    (runs / "01STRAYFILE0000000000000000").write_text("not a run")
    os.mkfifo(runs / "01STRAYFIFO0000000000000000")
    (runs / "01EMPTYDIR00000000000000000").mkdir()
    os.symlink(runs / kept, runs / "01SYMLINK0000000000000000000")
    (runs / "01MANIFESTDIR00000000000000" / "manifest.toml").mkdir(parents=True)
    (runs / "01MANIFESTFIFO0000000000000").mkdir()
    os.mkfifo(runs / "01MANIFESTFIFO0000000000000" / "manifest.toml")
    os.unlink(runs / cached / "manifest.json")
    os.mkfifo(runs / cached / "manifest.json")  # the read cache: a FIFO there blocked every reader
    make_old(registry)

    proc = subprocess.run(casruns_exe() + ["gc", "--json"], capture_output=True, text=True, timeout=30)  # a FIFO must not block it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = validate(json.loads(proc.stdout), "reports.schema.json#/$defs/gc")
    # the same objects verify reports (runs.run_stray): the path names the entry of the wrong type
    assert {s["path"]: s["kind"] for s in report["strays"]} == {
        "runs/01STRAYFILE0000000000000000": "file",
        "runs/01STRAYFIFO0000000000000000": "fifo",
        "runs/01EMPTYDIR00000000000000000": "directory",
        "runs/01SYMLINK0000000000000000000": "symlink",
        "runs/01MANIFESTDIR00000000000000/manifest.toml": "directory",
        "runs/01MANIFESTFIFO0000000000000/manifest.toml": "fifo",
        f"runs/{cached}/manifest.json": "fifo",
    }
    assert report["runs_removed"] == 1 and report["swept"] and report["blobs_removed"] >= 1
    assert report["runs_kept"] == 2 and not (runs / gone).exists()
    assert all((runs / s["path"][len("runs/"):]).exists() or os.path.islink(runs / s["path"][len("runs/"):]) for s in report["strays"])
    for name in ("01STRAYFIFO0000000000000000", f"{cached}/manifest.json"):
        os.unlink(runs / name)
    assert evidence(registry, kept)["k.txt"] == b"kept" and evidence(registry, cached)["c.txt"] == b"read from its TOML"


def test_a_real_run_whose_manifest_cannot_be_read_still_stops_gc(registry):
    config(registry, 'gc_grace = "0s"\n[retention]\nsucceeded = "0s"\n')
    rid = finished_run(registry)
    garbage = registry.store.put_bytes(b"unreferenced")
    make_old(registry)
    p = Path(registry.run_dir(rid).manifest_path)
    p.write_bytes(p.read_bytes() + b"\n[[[")
    p.with_suffix(".json").unlink(missing_ok=True)
    proc, out = cli_json("gc")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
    assert registry.store.contains(garbage.address)


# -- item 12b: far-future mtimes -------------------------------------------------------------------


def test_garbage_with_a_far_future_mtime_is_collected_eventually(registry, monkeypatch):
    config(registry, 'gc_grace = "1h"\n[retention]\nsucceeded = "0s"\n')
    store = registry.store
    soon = store.put_bytes(b"a clock three hours ahead")
    far = store.put_bytes(b"a clock ten days ahead")
    packed = finished_run(registry, files={f"p/{i}": f"packed {i}\n".encode() * 20 for i in range(40)})
    [pack] = store.pack_names()
    tmp = Path(store.tmp_dir)
    tmp.mkdir(exist_ok=True)
    temp = tmp / "999999999-dead.tmp"
    temp.write_bytes(b"partial")
    now = REAL_TIME()
    os.utime(store.path_for(soon.address), (now + 3 * 3600, now + 3 * 3600))
    for p in (store.path_for(far.address), store.pack_path(pack), temp):
        os.utime(p, (now + 10 * DAY, now + 10 * DAY))

    report = registry.gc()  # the run goes; its pack, the blobs and the temp are kept (young), far ones reset
    assert abs(os.stat(store.path_for(far.address)).st_mtime - now) < 60, "a far-future mtime is kept forever"
    assert abs(os.stat(temp).st_mtime - now) < 60 and abs(os.stat(store.pack_path(pack)).st_mtime - now) < 60
    assert report["runs_removed"] == 1 and report["mtimes_reset"] == 3
    assert os.stat(store.path_for(soon.address)).st_mtime > now + 3 * 3600 - 60  # within the bound: left alone
    assert not registry.run_dir(packed).exists()

    skew(monkeypatch, 2 * 3600)  # two hours on: past the grace from the reset
    report = registry.gc()
    assert not store.contains(far.address) and not temp.exists() and pack not in store.pack_names()
    assert store.contains(soon.address)  # still an hour ahead
    skew(monkeypatch, 5 * 3600)  # two hours past it
    registry.gc()
    assert not store.contains(soon.address)


def test_a_gc_whose_clock_went_backwards_resets_nothing(registry, monkeypatch):
    """A clock behind the previous gc's makes files written meanwhile look far in the future;
    stamping them with that clock would make them look old once it is put right."""
    config(registry, 'gc_grace = "1h"\n')
    registry.gc()  # a gc with a right clock ran
    blob = registry.store.put_bytes(b"written by a writer that does not pin, a moment ago")
    skew(monkeypatch, -5 * DAY)
    report = registry.gc()
    assert report.get("mtimes_reset", 0) == 0 and abs(os.stat(registry.store.path_for(blob.address)).st_mtime - REAL_TIME()) < 60
    monkeypatch.undo()
    registry.gc()
    assert registry.store.contains(blob.address)
