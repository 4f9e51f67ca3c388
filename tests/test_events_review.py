"""Hostile review of the event journal (spec/events.md, "Guarantees"): each test stops the code
at one exact step (a fault point, a full disk, a race) and checks one guarantee."""

from __future__ import annotations

import json
import os

import pytest

from casruns import Registry, faults
from casruns.journal import Journal

from conftest import cli, cli_json, poll_until


def journal(home) -> Journal:
    return Journal(os.path.join(home, "events"))


def assert_contiguous(events):
    """Per run and incarnation, seq is 1, 2, 3... in journal order, with no gap and no duplicate."""
    seen: dict = {}
    for e in events:
        key = (e["run_id"], e["incarnation"])
        assert e["seq"] == seen.get(key, 0) + 1, (key, e["seq"], seen.get(key), e["type"])
        seen[key] = e["seq"]
    return seen


def lost_running_run(registry) -> str:
    """A run in ``running`` whose supervisor is gone (none was ever spawned)."""
    from casruns import manifest as mf
    from casruns.timefmt import now_ts

    rid = registry.submit(["true"], spawn=False)["run_id"]
    run = registry.run_dir(rid)
    for status in (mf.BOOTING, mf.RUNNING):
        with run.update() as m:
            mf.transition(m, status, now_ts())
    return rid


def test_a_multi_event_append_torn_by_a_kill_is_not_duplicated(registry, casruns_home):
    """Reap salvaging a lost run appends two lines in one write (status, salvaged; the second is
    the longer). Killed with half the bytes written, the first line is whole in the journal (a
    reader may already have reported it); the next appender cuts the torn second line and the
    pending record is recovered. The recovery must append only what is missing: it appended both,
    so the status event was in the journal twice (seq 4, then seq 4 again, recovered)."""
    rid = lost_running_run(registry)
    proc = cli("reap", env={"CASRUNS_TEST_FAULT": "event_mid_append"})
    assert proc.returncode == -9
    events = list(Registry(str(casruns_home)).events(from_start=True))  # the reader repairs it
    assert not journal(casruns_home).pending_for(rid)
    assert [e["type"] for e in events] == ["created", "status", "status", "status", "salvaged"]
    assert_contiguous(events)
    assert [e["recovered"] for e in events[-2:]] == [False, True]


def test_a_multi_event_append_cut_short_by_a_full_disk_is_not_duplicated(registry, casruns_home, monkeypatch):
    """The same without a crash: the append hits a full disk after half its bytes, cuts back to
    the last newline (keeping the first, whole, line: a reader may have seen it), frees the
    reserve and retried the whole write: the first event was in the journal twice."""
    import errno

    rid = lost_running_run(registry)
    assert os.path.exists(journal(casruns_home).reserve_path)
    monkeypatch.setenv("CASRUNS_TEST_FAULT", "event_mid_append=enospc")
    faults.reset()
    real, hits = faults.point, []

    def once(name):  # the disk is full once: the reserve freed, the retry has room
        if name == "event_mid_append" and not hits:
            hits.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if name != "event_mid_append":
            real(name)

    monkeypatch.setattr(faults, "point", once)
    try:
        registry.reap()
    finally:
        monkeypatch.delenv("CASRUNS_TEST_FAULT")
        faults.reset()
    assert hits and registry.get(rid)["status"] == "failed"
    assert not os.path.exists(journal(casruns_home).reserve_path)  # the retry ran
    events = list(registry.events(from_start=True))
    assert [e["type"] for e in events] == ["created", "status", "status", "status", "salvaged"]
    assert_contiguous(events)
    assert not any(e["recovered"] for e in events)


def test_until_terminal_restarts_a_queued_run_whose_supervisor_died(registry):
    """spec: "While waiting it reaps named runs whose supervisor died ..., as `wait` does". `wait`
    restarts a queued run whose supervisor is gone; `events --until-terminal` only looked at
    active runs, so it waited for a queued orphan until its timeout (or forever)."""
    rid = registry.submit(["true"], spawn=False)["run_id"]  # queued, and no supervisor will come
    proc = cli("events", "--run", rid, "--until-terminal", "--timeout", "20", timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert registry.get(rid)["status"] == "succeeded"


def test_until_terminal_is_not_ended_by_an_earlier_incarnation_of_the_run_id(casruns_home, registry):
    """A caller-chosen run id removed by gc and submitted again: `events --until-terminal` (from
    the journal's start, its default) replays the old incarnation's events, and its terminal
    status ended the wait at once, with the old run's exit code, while the new run still ran."""
    (casruns_home / "config.toml").write_text('[retention]\ncancelled = "0s"\n')
    registry.submit(["true"], spawn=False, run_id="fixed-id")
    registry.cancel("fixed-id")
    cli("gc", check=0)
    cli("submit", "--run-id", "fixed-id", "--", "sleep", "1", check=0)
    proc = cli("events", "--run", "fixed-id", "--until-terminal", "--timeout", "20", timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)  # 12: the old run's `cancelled`
    assert registry.get("fixed-id")["status"] == "succeeded"


def test_until_terminal_prints_the_whole_update_that_made_the_run_terminal(registry):
    """A salvage commits `status` (running → failed) and `salvaged` in one update, one append.
    `--until-terminal` stopped at the `status` event, so the `salvaged` event of the run it was
    waiting for was never printed (likewise a queued run's `cancel_requested` ended it before
    the `status` event that follows it)."""
    import signal
    import subprocess
    import time

    from conftest import casruns_exe

    rid = json.loads(cli("submit", "--json", "--", "sleep", "60").stdout)["run_id"]
    poll_until(lambda: registry.get(rid)["status"] == "running", what="running")
    follower = subprocess.Popen(casruns_exe() + ["events", "--json", "--run", rid, "--until-terminal", "--timeout", "30"],
                                stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(follower.stdout.readline())  # it has started (from the journal's start)
        assert first["type"] == "created"
        time.sleep(0.3)
        os.kill(registry.manifest(rid)["supervisor"]["pid"], signal.SIGKILL)  # the follower reaps it
        rest, _ = follower.communicate(timeout=60)
    finally:
        follower.kill()
    types = [first["type"]] + [json.loads(l)["type"] for l in rest.splitlines()]
    assert follower.returncode == 10, (follower.returncode, types)
    assert types[-2:] == ["status", "salvaged"], types


def _fail_dir_sync_once(monkeypatch, path):
    import errno

    from casruns import fsutil

    real, hits = fsutil.fsync_dir, []

    def fsync_dir(p):
        if os.path.abspath(os.fspath(p)) == os.path.abspath(path) and not hits:
            hits.append(p)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(p)

    monkeypatch.setattr(fsutil, "fsync_dir", fsync_dir)
    return hits


def test_an_update_that_fails_after_its_manifest_rename_is_still_reported(registry, casruns_home, monkeypatch):
    """The manifest commit renames, then syncs the run directory. If the sync fails (EIO, or an
    interrupt) the new manifest is already what every reader sees, yet `update` abandoned the
    pending record: the change was never reported, and the next change's seq left a gap."""
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    hits = _fail_dir_sync_once(monkeypatch, registry.run_dir(rid).path)
    with pytest.raises(Exception):
        registry.promote(rid, reason="r")
    assert hits
    monkeypatch.undo()
    assert registry.get(rid)["retention"]["promoted"] is True  # committed: every reader sees it
    registry.retain(rid, for_="1d")  # the next writer
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert_contiguous(events)
    assert [e["type"] for e in events][-2:] == ["promoted", "retention_changed"]


def test_a_creation_that_fails_after_its_rename_is_still_reported(registry, casruns_home, monkeypatch):
    """The same for `create`: the run is renamed into place (it exists, a second submit of the id
    gets "exists"), then the sync of runs/ fails: the `created` event was abandoned."""
    runs_dir = os.path.join(casruns_home, "runs")
    hits = _fail_dir_sync_once(monkeypatch, runs_dir)
    with pytest.raises(Exception):
        registry.submit(["true"], spawn=False, run_id="fixed-id")
    assert hits
    monkeypatch.undo()
    if not os.path.isdir(os.path.join(runs_dir, "fixed-id")):
        return  # not committed: nothing to report
    registry.cancel("fixed-id")
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert_contiguous(events)
    assert [e["type"] for e in events] == ["created", "cancel_requested", "status"]


def test_a_stopped_losing_creator_of_the_same_run_id_does_not_block_the_winners_writers(registry, casruns_home):
    """Two submits race for one caller-chosen id. The one stopped (SIGSTOP, Ctrl-Z) between its
    pending record and its rename holds the flock of a record of *its* incarnation; the other
    creates the run. Every writer of the created run settled pending records of the id with
    wait=True, so it waited on the stopped loser forever: cancel (and the supervisor) hung."""
    import signal
    import subprocess

    from conftest import casruns_exe

    env = dict(os.environ, CASRUNS_TEST_FAULT="event_after_pending=stop")
    loser = subprocess.Popen(casruns_exe() + ["submit", "--run-id", "fixed-id", "--", "true"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll_until(lambda: journal(casruns_home).pending_for("fixed-id"), what="the loser's pending record")
        registry.submit(["true"], spawn=False, run_id="fixed-id")  # the winner
        proc = cli("cancel", "fixed-id", timeout=15)  # raised TimeoutExpired: waited on the stopped loser
        assert proc.returncode == 0, proc.stderr
        assert registry.get("fixed-id")["status"] == "cancelled"
    finally:
        loser.send_signal(signal.SIGKILL)
        loser.wait()
    # the loser's record never committed: dropped by the next repairer, never reported
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert [e["type"] for e in events] == ["created", "cancel_requested", "status"]
    assert not journal(casruns_home).pending_for("fixed-id")


def test_a_stray_segment_does_not_stop_the_next_writer_or_reap(registry, casruns_home):
    """spec (d882b7f): a stray where a segment belongs fails readers "while writers still commit".
    The first change does; its record is left pending. The next writer of the run settles that
    record first, and the repair's append raised the stray out of `update`: the run could not
    be changed at all, and `reap` (which settles every record first) failed as a whole, so no
    lost run was reaped while the journal was broken."""
    rid = registry.submit(["true"], spawn=False)["run_id"]
    lost = lost_running_run(registry)
    j = journal(casruns_home)
    seg = j.segment_path(j.segments()[-1])
    os.rename(seg, seg + ".moved")
    os.mkfifo(seg, 0o600)
    assert cli("cancel", rid, timeout=20).returncode == 0 and j.pending_for(rid)
    proc = cli("promote", rid, "--reason", "r", timeout=20)  # the next writer: settles, then commits
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc, out = cli_json("reap", timeout=20)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert registry.manifest(lost)["status"] == "failed"
    os.unlink(seg)
    os.rename(seg + ".moved", seg)
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert_contiguous(events)
    assert [e["type"] for e in events if e["run_id"] == rid][-3:] == ["cancel_requested", "status", "promoted"]
    assert not j.pending_for()


def test_records_left_pending_for_one_run_are_recovered_in_seq_order(registry, casruns_home):
    """Several changes of one run committed while the journal could not be appended to: each
    waits, pending, and the repair appends them in seq order (records sorted by name would put
    seq 10 before seq 9), never a later change before an earlier one."""
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)  # seq 3
    for i in range(5):  # seq 4..8
        registry.retain(rid, for_=f"{i + 1}d")
    j = journal(casruns_home)
    seg = j.segment_path(j.segments()[-1])
    os.rename(seg, seg + ".moved")
    os.mkfifo(seg, 0o600)
    for i in range(3):  # seq 9, 10, 11: committed, their events pending
        assert cli("retain", rid, "--for", f"{i + 10}d", timeout=20).returncode == 0
    assert registry.manifest(rid)["event_seq"] == 11 and len(j.pending_for(rid)) == 3
    os.unlink(seg)
    os.rename(seg + ".moved", seg)
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert_contiguous(events)
    assert [e["seq"] for e in events if e["recovered"]] == [9, 10, 11]
    assert not j.pending_for()


def test_a_repairer_never_appends_a_runs_later_record_while_an_earlier_one_is_being_settled(registry, casruns_home):
    """Two records of one run left pending (their appends failed). A repairer found the first
    one's flock held (another repairer appending it right now) and skipped it, but went on to
    append the second: seq 5 could land before seq 4."""
    import fcntl

    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)  # seq 3
    j = journal(casruns_home)
    seg = j.segment_path(j.segments()[-1])
    os.rename(seg, seg + ".moved")
    os.mkfifo(seg, 0o600)
    for days in ("1d", "2d"):  # seq 4, 5: committed, pending
        assert cli("retain", rid, "--for", days, timeout=20).returncode == 0
    os.unlink(seg)
    os.rename(seg + ".moved", seg)
    first = os.path.join(j.pending_dir, j.pending_for(rid)[0])
    assert "+4+" in first
    fd = os.open(first, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a repairer busy with seq 4
        proc, out = cli_json("events", "--from-start", timeout=20)  # another repairer
        assert proc.returncode == 0
        assert [e["seq"] for e in out if e["run_id"] == rid] == [1, 2, 3]  # seq 5 waits behind seq 4
    finally:
        os.close(fd)
    events = list(Registry(str(casruns_home)).events(from_start=True))
    assert_contiguous(events)
    assert not j.pending_for()


def test_gc_frees_space_on_a_full_disk_after_a_writer_used_the_reserve(tmp_path, monkeypatch):
    """Before events, gc's removal needed no room (a rename, then rmtree). Now each removal
    first writes a pending record. The reserve is freed by "the first writer that hits a full
    disk", which is rarely gc: once that room is taken again (the disk is shared), gc cannot
    record any removal, removes nothing, and the full disk can no longer be freed by gc."""
    from conftest import fill_disk, mounted_tmpfs

    with mounted_tmpfs(tmp_path / "fs", 8) as mnt:
        def fill(name):
            fill_disk(mnt / name)

        home = mnt / "reg"
        monkeypatch.setenv("CASRUNS_HOME", str(home))
        cli("init", check=0)
        (home / "config.toml").write_text('gc_grace = "0s"\n[retention]\ncancelled = "0s"\n')
        reg = Registry(str(home))
        old = [reg.submit(["true"], spawn=False)["run_id"] for _ in range(3)]
        for rid in old:
            reg.cancel(rid)
        keep = reg.submit(["true"], spawn=False)["run_id"]
        fill("filler")
        assert cli("retain", keep, "--for", "1d").returncode == 0  # hits the full disk: frees the reserve
        assert not os.path.exists(home / "events" / "reserve")
        fill("filler2")  # whatever filled the disk takes that room too
        proc, out = cli_json("gc")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert out[0]["runs_removed"] == 3, out  # 0: no removal could be recorded


def test_the_reserve_is_freed_when_creating_the_pending_record_hits_a_full_disk(registry, casruns_home, monkeypatch):
    """A full disk can fail the creation of the pending record itself (no inode, no directory
    block: ENOSPC from open). open_private turns that into NoSpace, which `_with_space` (catching
    OSError only) let through: the reserve was never freed and the change failed with no_space."""
    import errno

    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    pending_dir = journal(casruns_home).pending_dir
    real_open, hits = os.open, []

    def full_open(path, flags, *a, **kw):
        if str(path).startswith(pending_dir) and flags & os.O_CREAT and not hits:
            hits.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", full_open)
    registry.promote(rid, reason="r")  # raised no_space with the reserve still there
    monkeypatch.undo()
    assert hits and not os.path.exists(journal(casruns_home).reserve_path)
    events = list(registry.events(from_start=True))
    assert [e["type"] for e in events] == ["created", "cancel_requested", "status", "promoted"]
