"""The event journal (spec/events.md): what is reported, cursors, resuming, expiry, and each crash
window of the commit stopped with a fault point."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from pathlib import Path

from casruns import Registry
from casruns.journal import Journal, decode_line

from conftest import cli, cli_json, poll_until


def journal(home) -> Journal:
    return Journal(os.path.join(home, "events"))


def all_events(**kw):
    proc, out = cli_json("events", "--from-start", **kw)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def raw_lines(home) -> list[bytes]:
    j = journal(home)
    data = b"".join(open(j.segment_path(s), "rb").read() for s in j.segments())
    return data.splitlines(keepends=True)


def assert_contiguous(events):
    """Per run and incarnation, seq is 1, 2, 3... in journal order, with no gap and no duplicate."""
    seen: dict = {}
    for e in events:
        key = (e["run_id"], e["incarnation"])
        assert e["seq"] == seen.get(key, 0) + 1, (key, e["seq"], seen.get(key))
        seen[key] = e["seq"]
    return seen


def test_a_runs_life_is_reported_in_order_and_matches_the_schema(casruns_home, validate):
    rid = json.loads(cli("submit", "--json", "--label", "suite=unit", "--", "sh", "-c", "echo hi; exit 3").stdout)["run_id"]
    assert cli("wait", rid).returncode == 10
    cli("promote", rid, "--reason", "keep the failure", "--by", "ci", check=0)
    cli("retain", rid, "--for", "30d", check=0)
    cli("unpromote", rid, "--reason", "not needed", check=0)
    events = all_events()
    for e in events:
        validate(e, "event.schema.json")
    assert_contiguous(events)
    types = [e["type"] for e in events]
    statuses = [(e["old_status"], e["new_status"]) for e in events if e["type"] == "status"]
    assert types[0] == "created" and events[0]["new_status"] == "queued"
    assert statuses == [("queued", "booting"), ("booting", "running"), ("running", "collecting_artifacts"), ("collecting_artifacts", "failed")]
    final = next(e for e in events if e["type"] == "status" and e["new_status"] == "failed")
    assert final["exit_code"] == 3 and final["error"]["code"] == "command_failed"
    assert final["run"]["labels"] == {"suite": "unit"} and final["run"]["provider"] == "shell" and final["run"]["attempt"] == 1
    assert types[-3:] == ["promoted", "retention_changed", "unpromoted"]
    assert events[-3]["detail"] == {"reason": "keep the failure", "by": "ci"} and events[-3]["run"]["promoted"] is True
    assert events[-2]["detail"]["retain_for"] == 30 * 86400
    assert not any(e["recovered"] for e in events)
    # the manifest's event_seq and the record's say how many changes there were
    rec = json.loads(cli("status", "--json", rid).stdout)
    assert rec["event_seq"] == len(events) and rec["incarnation"] == events[0]["incarnation"]
    # cursors increase, and the text form names each
    cursors = [e["cursor"] for e in events]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    text = cli("events").stdout.splitlines()
    assert len(text) == len(events) and text[-1].startswith(cursors[-1]) and f"{rid}#{len(events)}" in text[-1]


def test_resume_from_every_cursor_of_a_recorded_stream(registry):
    for i in range(4):
        rid = registry.submit(["true"], spawn=False, labels={"i": str(i)})["run_id"]
        registry.cancel(rid, reason=f"r{i}")
    events = list(registry.events(from_start=True))
    assert len(events) >= 12
    for i, e in enumerate(events):
        rest = list(registry.events(since=e["cursor"]))
        assert rest == events[i + 1:]
    proc, out = cli_json("events", "--since", events[5]["cursor"])
    assert proc.returncode == 0 and out == events[6:]


@pytest.mark.parametrize("cursor,why", [
    ("9999999999999999", "ahead"), ("0000000000000003", "boundary"), ("12", "16-digit"), ("abcdabcdabcdabcd", "16-digit"),
])
def test_a_cursor_that_is_not_one_is_invalid_input(registry, cursor, why):
    registry.submit(["true"], spawn=False)
    proc, out = cli_json("events", "--since", cursor)
    assert proc.returncode == 3 and out[0]["error"]["code"] == "invalid_input" and why in out[0]["error"]["message"]


def test_expired_cursors_and_segment_gc(casruns_home, registry, monkeypatch):
    monkeypatch.setenv("CASRUNS_EVENTS_SEGMENT_BYTES", "4096")
    for _ in range(12):
        rid = registry.submit(["true"], spawn=False)["run_id"]
        registry.cancel(rid)
    j = journal(casruns_home)
    starts = j.segments()
    assert len(starts) >= 3
    events = list(registry.events(from_start=True))
    assert_contiguous(events)
    # every segment but the newest is older than events_keep
    old = time.time() - 8 * 86400
    for s in starts[:-1]:
        os.utime(j.segment_path(s), (old, old))
    proc, out = cli_json("gc", "--dry-run")
    assert out[0]["event_segments_removed"] == len(starts) - 1 and j.segments() == starts
    proc, out = cli_json("gc")
    assert proc.returncode == 0 and out[0]["event_segments_removed"] == len(starts) - 1
    assert j.segments() == starts[-1:]
    first_kept = next(e for e in events if int(e["cursor"]) > starts[-1])
    proc, out = cli_json("events", "--since", events[0]["cursor"])
    assert proc.returncode == 15
    err = out[0]["error"]
    assert err["code"] == "cursor_expired" and "list --json" in err["message"] and err["details"]["oldest"] == f"{starts[-1]:016d}"
    # the cursor at the very end of a removed segment still resumes: nothing after it is lost
    boundary = next(e for e in events if int(e["cursor"]) == starts[-1])
    assert list(registry.events(since=boundary["cursor"])) == [e for e in events if int(e["cursor"]) > starts[-1]]
    assert list(registry.events(from_start=True))[0] == first_kept
    # the list snapshot carries a cursor to resynchronize from
    proc, out = cli_json("list")
    assert out[0]["cursor"] == events[-1]["cursor"]


def test_filters_by_run_label_and_type(registry):
    a = registry.submit(["true"], spawn=False, labels={"suite": "unit"})["run_id"]
    b = registry.submit(["true"], spawn=False, labels={"suite": "e2e"})["run_id"]
    registry.cancel(a)
    registry.cancel(b)
    assert {e["run_id"] for e in registry.events(run_ids=[a])} == {a}
    assert {e["run_id"] for e in registry.events(labels={"suite": "e2e"})} == {b}
    cancelled = list(registry.events(types=["cancelled"]))
    assert [(e["run_id"], e["type"]) for e in cancelled] == [(a, "status"), (b, "status")]
    assert [e["type"] for e in registry.events(types=["created", "cancel_requested"], run_ids=[b])] == ["created", "cancel_requested"]
    proc, out = cli_json("events", "--type", "nonsense")
    assert proc.returncode == 3 and "unknown event type" in out[0]["error"]["message"]
    proc, out = cli_json("events", "--until-terminal")
    assert proc.returncode == 3 and "--run" in out[0]["error"]["message"]


# -- crash windows -------------------------------------------------------------------------


def promote_killed_at(registry, point: str, reason: str = "r") -> str:
    """A finished run whose `promote` process is SIGKILLed at one fault point; its id."""
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    proc = cli("promote", rid, "--reason", reason, env={"CASRUNS_TEST_FAULT": point})
    assert proc.returncode == -9
    return rid


def test_killed_after_commit_the_event_is_recovered_by_a_reader(registry, casruns_home):
    rid = promote_killed_at(registry, "event_after_commit", "r")
    assert registry.get(rid)["retention"]["promoted"] is True  # committed
    j = journal(casruns_home)
    assert len(j.pending_for(rid)) == 1
    assert [e["type"] for e in registry.events(from_start=True)][-1] == "promoted"  # the reader repaired it
    events = list(registry.events(from_start=True))
    assert events[-1]["recovered"] is True and events[-1]["detail"]["reason"] == "r"
    assert not j.pending_for(rid)
    assert_contiguous(events)
    assert sum(e["type"] == "promoted" for e in events) == 1


def test_killed_before_commit_nothing_is_reported_and_the_seq_is_reused(registry, casruns_home):
    rid = promote_killed_at(registry, "event_after_pending", "r")
    before = registry.get(rid)["event_seq"]  # the killed promote never committed
    assert registry.get(rid)["retention"]["promoted"] is False and before == 3  # created, cancel_requested, status
    assert journal(casruns_home).pending_for(rid)
    # the next writer of the run settles the dead writer's record first: dropped, never reported
    registry.promote(rid, reason="again")
    events = list(registry.events(from_start=True))
    promoted = [e for e in events if e["type"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["detail"]["reason"] == "again" and promoted[0]["seq"] == before + 1
    assert not promoted[0]["recovered"] and not journal(casruns_home).pending_for(rid)
    assert_contiguous(events)


def test_a_torn_append_is_cut_and_the_event_recovered_in_order_by_the_next_writer(registry, casruns_home):
    rid = promote_killed_at(registry, "event_mid_append", "torn")
    lines = raw_lines(casruns_home)
    assert not lines[-1].endswith(b"\n")  # half a line at the end
    registry.retain(rid, for_="1d")  # the next writer: repairs, then its own change
    lines = raw_lines(casruns_home)
    assert all(l.endswith(b"\n") for l in lines)
    for l in lines:
        decode_line(l.rstrip(b"\n"), "test")
    events = list(registry.events(from_start=True))
    assert [e["type"] for e in events[-2:]] == ["promoted", "retention_changed"]
    assert events[-2]["recovered"] and not events[-1]["recovered"]
    assert_contiguous(events)


def test_killed_after_append_the_event_is_not_duplicated(registry, casruns_home):
    rid = promote_killed_at(registry, "event_after_append", "r")
    assert journal(casruns_home).pending_for(rid)
    proc, out = cli_json("reap")
    assert out[0]["events_settled"] == 1 and not journal(casruns_home).pending_for(rid)
    events = list(registry.events(from_start=True))
    assert sum(e["type"] == "promoted" for e in events) == 1 and not events[-1]["recovered"]
    assert_contiguous(events)


@pytest.mark.parametrize("nth,salvaged", [(2, True), (4, True), (6, False)])
def test_a_supervisor_killed_after_each_commit_is_reported_whole(casruns_home, nth, salvaged):
    """SIGKILL the supervisor right after its n-th manifest commit (2: booting, 4: running, 6: the
    terminal one; the submitter reaches the point once, at creation, and lives): the stream holds
    every committed change, the killed one recovered, and reap's salvage, in order."""
    env = {"CASRUNS_TEST_FAULT": f"event_after_commit=kill@{nth}"}
    rid = json.loads(cli("submit", "--json", "--", "sleep", "0.2", env=env).stdout)["run_id"]
    active = ("queued", "booting", "running", "collecting_artifacts")
    poll_until(lambda: json.loads(cli("status", "--json", rid).stdout)["status"] not in active, what="the run ended or reaped")
    # the reaping status (a later writer of the run) or, for the terminal commit, this reader repairs it
    events = all_events()
    assert_contiguous(events)
    mine = [e for e in events if e["run_id"] == rid]
    rec = json.loads(cli("status", "--json", rid).stdout)
    assert mine[-1]["seq"] == rec["event_seq"] and not journal(casruns_home).pending_for(rid)
    recovered = [e for e in mine if e["recovered"]]
    assert len(recovered) == 1
    assert ("salvaged" in [e["type"] for e in mine]) == salvaged
    assert rec["status"] == ("failed" if salvaged else "succeeded")
    if salvaged:
        assert mine.index(recovered[0]) < [e["type"] for e in mine].index("salvaged")


def test_concurrent_writers_never_tear_or_interleave(casruns_home):
    reg = Registry(str(casruns_home))
    ids = [reg.submit(["true"], spawn=False)["run_id"] for _ in range(6)]
    for rid in ids:
        reg.cancel(rid)
    script = (
        "import sys; from casruns import Registry\n"
        "reg = Registry(sys.argv[1]); rid = sys.argv[2]\n"
        "for i in range(15):\n"
        "    reg.promote(rid, reason=f'p{i}'); reg.retain(rid, for_=f'{i+1}d'); reg.unpromote(rid, reason=f'u{i}')\n"
    )
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", script, str(casruns_home), rid]) for rid in ids]
    # a second writer per run, and submits at the same time
    procs += [subprocess.Popen([sys.executable, "-c", script, str(casruns_home), rid]) for rid in ids[:3]]
    more = [reg.submit(["true"], spawn=False)["run_id"] for _ in range(10)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    for l in raw_lines(casruns_home):
        assert l.endswith(b"\n")
        decode_line(l.rstrip(b"\n"), "test")
    events = list(reg.events(from_start=True))
    seen = assert_contiguous(events)
    for rid in ids + more:
        assert seen[(rid, reg.get(rid)["incarnation"])] == reg.get(rid)["event_seq"]
    # two writers race on three runs (one may find it already promoted): every promotion the
    # manifests' histories hold is an event, and no other
    history = [h["action"] for rid in ids for h in reg.get(rid)["retention"]["history"]]
    assert sum(e["type"] == "promoted" for e in events) == history.count("promote") >= 6 * 15
    assert sum(e["type"] == "unpromoted" for e in events) == history.count("unpromote")


def _follower(*args, env=None):
    import sys

    full = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "casruns", "events", "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)


@pytest.mark.parametrize("notify", ["inotify", "poll"])
def test_followers_started_before_and_after_a_burst_see_the_same_stream(casruns_home, notify):
    env = {"CASRUNS_NOTIFY": "poll"} if notify == "poll" else {}
    cli("init", check=0)
    start = json.loads(cli("list", "--json").stdout)["cursor"]
    before = _follower("--follow", "--since", start, env=env)
    time.sleep(0.3)
    ids = [json.loads(cli("submit", "--json", "--", "echo", str(i)).stdout)["run_id"] for i in range(5)]
    assert cli("wait", *ids).returncode == 0
    after = _follower("--since", start, env=env)
    out_after, _ = after.communicate(timeout=30)
    expected = [json.loads(l) for l in out_after.splitlines()]
    assert len(expected) >= 5 * 6
    got = []
    deadline = time.monotonic() + 30
    while len(got) < len(expected) and time.monotonic() < deadline:
        line = before.stdout.readline()
        if line:
            got.append(json.loads(line))
    before.kill()
    before.wait()
    assert got == expected
    # and a follower that waits for named runs exits with wait's code
    bad = json.loads(cli("submit", "--json", "--", "sh", "-c", "sleep 0.3; exit 4").stdout)["run_id"]
    proc, out = cli_json("events", "--run", bad, "--until-terminal", "--follow", env=env)
    assert proc.returncode == 10 and out[-1]["new_status"] == "failed"
    proc = cli("events", "--run", ids[0], "--until-terminal", env=env)
    assert proc.returncode == 0  # already terminal: exits at once
    slow = json.loads(cli("submit", "--json", "--", "sleep", "30").stdout)["run_id"]
    proc = cli("events", "--run", slow, "--until-terminal", "--timeout", "0.5s", env=env)
    assert proc.returncode == 13
    cli("cancel", slow, check=0)


def test_gc_removal_is_an_event(casruns_home, registry):
    (casruns_home / "config.toml").write_text('[retention]\ncancelled = "0s"\n')
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    proc, out = cli_json("gc")  # a zero hold: removed at the first sighting
    assert out[0]["runs_removed"] == 1
    events = list(Registry(str(casruns_home)).events(run_ids=[rid]))
    assert events[-1]["type"] == "removed" and events[-1]["old_status"] == "cancelled" and events[-1]["detail"] == {"reason": "retention"}
    assert_contiguous(events)


def test_gc_killed_after_the_rename_reports_the_removal_once(casruns_home, registry):
    (casruns_home / "config.toml").write_text('[retention]\ncancelled = "0s"\n')
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    proc = cli("gc", env={"CASRUNS_TEST_FAULT": "gc_after_run_rename"})
    assert proc.returncode == -9
    assert not (casruns_home / "runs" / rid).exists()
    events = list(Registry(str(casruns_home)).events(run_ids=[rid]))  # the reader repairs it
    assert [e["type"] for e in events][-1] == "removed" and events[-1]["recovered"]
    cli("gc", check=0)
    assert sum(e["type"] == "removed" for e in Registry(str(casruns_home)).events(run_ids=[rid])) == 1


def test_list_cursor_and_event_seq_let_a_consumer_resynchronize(registry):
    a = registry.submit(["true"], spawn=False)["run_id"]
    proc, out = cli_json("list")
    snapshot = out[0]
    registry.cancel(a)
    b = registry.submit(["true"], spawn=False)["run_id"]
    later = list(registry.events(since=snapshot["cursor"]))
    assert [(e["run_id"], e["type"]) for e in later] == [(a, "cancel_requested"), (a, "status"), (b, "created")]
    seqs = {r["run_id"]: r["event_seq"] for r in snapshot["runs"]}
    assert all(e["seq"] > seqs.get(e["run_id"], 0) for e in later)


def test_a_recreated_run_id_is_a_new_incarnation(casruns_home, registry):
    (casruns_home / "config.toml").write_text('[retention]\ncancelled = "0s"\n')
    registry.submit(["true"], spawn=False, run_id="fixed-id")
    registry.cancel("fixed-id")
    cli("gc", check=0)
    registry.submit(["true"], spawn=False, run_id="fixed-id")
    events = list(registry.events(run_ids=["fixed-id"]))
    assert [e["type"] for e in events] == ["created", "cancel_requested", "status", "removed", "created"]
    assert events[0]["incarnation"] != events[-1]["incarnation"] and events[-1]["seq"] == 1
    assert_contiguous(events)


def test_events_in_homeboys_format_match_its_schema(casruns_home):
    import jsonschema

    schema = json.loads((Path(__file__).parent / "schemas" / "homeboy-run-lifecycle-record.v1.schema.json").read_text())
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "exit 2").stdout)["run_id"]
    cli("wait", rid)
    cli("promote", rid, "--reason", "r", check=0)
    proc = cli("events", "--from-start", "--format", "homeboy")
    records = [json.loads(l) for l in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(records) == len(all_events())
    for r in records:
        jsonschema.validate(r, schema)
    states = [r["execution"]["state"] for r in records]
    assert states[0] == "queued" and states[-1] == "failed" and "running" in states
    assert records[-1]["provider_runtime"][0]["task_id"] == rid


def test_the_journal_directory_replaced_by_a_symlink_is_refused(registry, casruns_home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    import shutil

    shutil.rmtree(casruns_home / "events" / "pending")
    (casruns_home / "events" / "pending").symlink_to(elsewhere)
    proc, out = cli_json("submit", "--", "true")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsafe_registry"
    assert not list(elsewhere.iterdir())


def test_a_fifo_where_the_journal_should_be_neither_hangs_nor_loses_a_change(registry, casruns_home):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    j = journal(casruns_home)
    seg = j.segment_path(j.segments()[-1])
    os.rename(seg, seg + ".moved")
    os.mkfifo(seg, 0o600)
    proc = cli("cancel", rid, timeout=20)  # commits; its append fails on the stray and stays pending
    assert proc.returncode == 0 and registry.get(rid)["status"] == "cancelled"
    assert j.pending_for(rid)
    proc, out = cli_json("events", "--from-start", timeout=20)
    assert proc.returncode == 6 and out[0]["error"]["code"] == "stray_file"
    os.unlink(seg)
    os.rename(seg + ".moved", seg)
    events = all_events()  # the reader publishes what was pending, recovered
    assert [e["type"] for e in events][-2:] == ["cancel_requested", "status"] and events[-1]["recovered"]
    assert_contiguous(events)


def test_verify_checks_the_journal_against_the_manifests(registry, casruns_home):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid)
    proc, out = cli_json("verify")
    assert proc.returncode == 0 and out[0]["ok"], out
    j = journal(casruns_home)
    seg = j.segment_path(j.segments()[-1])
    data = open(seg, "rb").read()
    # the last change's event lost (the segment cut back a line), nothing pending: event_missing
    cut = data[: data.rstrip(b"\n").rfind(b"\n") + 1]
    open(seg, "wb").write(cut)
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and [p["kind"] for p in out[0]["problems"]] == ["event_missing"]
    # an event reported beyond what the manifest committed: event_ahead
    from casruns.journal import encode_line

    bogus = json.loads(data.splitlines()[-1][9:])
    bogus["seq"] = 99
    open(seg, "wb").write(data + encode_line(bogus))
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and [p["kind"] for p in out[0]["problems"]] == ["event_ahead"]
    # one flipped byte in a line: its checksum fails, for verify and for readers
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    open(seg, "wb").write(bytes(flipped))
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and [p["kind"] for p in out[0]["problems"]] == ["event_journal_damaged"]
    proc, out = cli_json("events", "--from-start")
    assert proc.returncode == 7 and out[-1]["error"]["code"] == "integrity_error" and "checksum" in out[-1]["error"]["message"]



def test_a_cancel_reason_is_redacted_before_it_is_stored_or_journaled(registry, casruns_home):
    secret = "ghp_" + "a1B2" * 9
    rid = registry.submit(["true"], spawn=False)["run_id"]
    registry.cancel(rid, reason=f"leaked {secret} here")
    rec = registry.get(rid)
    assert secret not in json.dumps(rec) and "REDACTED" in rec["cancel"]["reason"]
    for path in (casruns_home / "runs" / rid).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert not any(secret.encode() in l for l in raw_lines(casruns_home))
