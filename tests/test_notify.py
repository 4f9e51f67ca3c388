"""casruns.notify (waking on a change without busy polling) and what stands on it: wait,
logs --follow, and resuming a log with logs --offset / --json."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from casruns import notify
from conftest import casruns_exe, cli, cli_json, poll_until

KINDS = ["inotify", "poll"]


@pytest.fixture(params=KINDS)
def kind(request, monkeypatch):
    if request.param == "inotify":
        if not sys.platform.startswith("linux"):
            pytest.skip("inotify is Linux only")
        monkeypatch.delenv("CASRUNS_NOTIFY", raising=False)
    else:
        monkeypatch.setenv("CASRUNS_NOTIFY", "poll")
    return request.param


def later(action, delay=0.2):
    """Run ``action`` in a thread after ``delay`` seconds (while the test waits)."""
    t = threading.Thread(target=lambda: (time.sleep(delay), action()))
    t.start()
    return t


def test_kind_is_the_one_asked_for(kind, tmp_path):
    with notify.watch([tmp_path]) as w:
        assert w.kind == kind


def test_times_out_when_nothing_changes(kind, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with notify.watch([tmp_path, tmp_path / "f", tmp_path / "missing"]) as w:
        assert w.wait(0) is False
        start = time.monotonic()
        assert w.wait(0.3) is False
        assert time.monotonic() - start >= 0.29  # it waited the whole timeout, then said so


def test_wakes_on_an_append_to_a_file_in_a_watched_directory(kind, tmp_path):
    f = tmp_path / "spool"
    f.write_bytes(b"one\n")
    with notify.watch([tmp_path]) as w:
        assert w.wait(0) is False

        def append():
            with open(f, "ab") as fh:
                fh.write(b"two\n")

        t = later(append)
        assert w.wait(20) is True
        t.join()
        assert f.read_bytes() == b"one\ntwo\n"


def test_wakes_on_an_append_to_a_watched_file(kind, tmp_path):
    f = tmp_path / "log"
    f.write_bytes(b"")
    with notify.watch([f]) as w:
        t = later(lambda: f.write_bytes(b"more"))
        assert w.wait(20) is True
        t.join()


def test_wakes_on_a_rename_into_a_watched_directory(kind, tmp_path):
    watched, elsewhere = tmp_path / "run", tmp_path / "tmp"
    watched.mkdir()
    elsewhere.mkdir()
    (elsewhere / "manifest.new").write_bytes(b"status = 'succeeded'\n")
    with notify.watch([watched]) as w:
        assert w.wait(0) is False
        t = later(lambda: os.rename(elsewhere / "manifest.new", watched / "manifest.toml"))
        assert w.wait(20) is True
        t.join()


def test_wakes_when_a_missing_path_is_created(kind, tmp_path):
    target = tmp_path / "a" / "b" / "spool"
    with notify.watch([target]) as w:
        assert w.wait(0) is False

        def create():
            target.parent.mkdir(parents=True)
            target.write_bytes(b"hi")

        t = later(create)
        assert w.wait(20) is True
        t.join()
        poll_until(lambda: target.exists(), what="the file")
        w.wait(0.2)  # settle whatever else the creation reported
        # from now on the path itself is watched
        t = later(lambda: target.write_bytes(b"hi again"))
        assert w.wait(20) is True
        t.join()


def test_a_watched_directory_removed_and_made_again_is_watched_again(kind, tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    with notify.watch([d]) as w:
        d.rmdir()
        assert w.wait(5) is True
        w.wait(0.2)
        t = later(lambda: d.mkdir())
        assert w.wait(20) is True
        t.join()
        w.wait(0.2)
        t = later(lambda: (d / "stdout").write_bytes(b"x"))
        assert w.wait(20) is True
        t.join()


def test_add_after_creation(kind, tmp_path):
    with notify.watch() as w:
        assert w.wait(0.05) is False
        (tmp_path / "late").mkdir()
        w.add(tmp_path / "late")
        t = later(lambda: (tmp_path / "late" / "x").write_bytes(b"1"))
        assert w.wait(20) is True
        t.join()


def test_the_inotify_waiter_sleeps_in_the_kernel(monkeypatch, tmp_path):
    """CPU time, not wall-clock: an idle second of waiting costs next to nothing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify is Linux only")
    monkeypatch.delenv("CASRUNS_NOTIFY", raising=False)
    with notify.watch([tmp_path, tmp_path / "missing"]) as w:
        assert w.kind == "inotify"
        cpu = time.process_time()
        assert w.wait(1.0) is False
        assert time.process_time() - cpu < 0.2


def test_inotify_unavailable_falls_back_to_polling(monkeypatch, tmp_path):
    def refuse(self):
        raise OSError(24, "inotify_init1: Too many open files")  # EMFILE: max_user_instances

    monkeypatch.delenv("CASRUNS_NOTIFY", raising=False)
    monkeypatch.setattr(notify.InotifyWatch, "__init__", refuse)
    with notify.watch([tmp_path]) as w:
        assert w.kind == "poll"
        t = later(lambda: (tmp_path / "x").write_bytes(b"1"))
        assert w.wait(20) is True
        t.join()


def test_the_inotify_watcher_closes_its_descriptor(monkeypatch, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify is Linux only")
    monkeypatch.delenv("CASRUNS_NOTIFY", raising=False)
    with notify.watch([tmp_path]) as w:
        fd = w.fd
        os.fstat(fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_status_does_not_import_ctypes(casruns_home):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "casruns", "status", "X"],
                          capture_output=True, text=True)
    assert "ctypes" not in proc.stderr and "casruns.notify" not in proc.stderr


# -- logs --offset and --json (real supervisors) ------------------------------------------------

GATED = 'printf "012345678\\n"; while [ ! -e "$0" ]; do sleep 0.05; done; printf "\\377\\376 h\\303\\251llo\\n"; printf "end\\n"'
FULL = b"012345678\n\xff\xfe h\xc3\xa9llo\nend\n"


def logs_bytes(*args, env=None) -> bytes:
    proc = subprocess.run(casruns_exe() + ["logs", *map(str, args)], capture_output=True, env={**os.environ, **(env or {})},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def chunks_of(lines: list[dict], validate) -> tuple[list[dict], dict]:
    for line in lines:
        validate(line, "log-chunk.schema.json")
    assert lines and lines[-1].get("end") is True
    return lines[:-1], lines[-1]


def joined(chunks: list[dict], start: int) -> bytes:
    """The chunks' bytes, checking that their offsets are contiguous from ``start``."""
    out = b""
    for c in chunks:
        assert c["offset"] == start + len(out)
        data = c["data"].encode() if c["encoding"] == "utf-8" else base64.b64decode(c["data"])
        assert len(data) == c["length"]
        out += data
    return out


def gated_run(registry, tmp_path):
    """A run that prints a line (the capture passes whole lines: the redactor holds a partial
    one), then waits for the gate file before printing the rest."""
    gate = tmp_path / "gate"
    rid = registry.submit(["sh", "-c", GATED, str(gate)])["run_id"]
    poll_until(lambda: b"".join(registry.log_chunks(rid)) == b"012345678\n", what="the first output")
    return rid, gate


@pytest.mark.slow
def test_logs_offset_on_a_live_then_finished_run(registry, tmp_path, validate):
    rid, gate = gated_run(registry, tmp_path)
    assert logs_bytes(rid, "--offset", 4) == b"45678\n"
    proc, lines = cli_json("logs", rid, "--offset", 4)
    chunks, end = chunks_of(lines, validate)
    assert joined(chunks, 4) == b"45678\n"
    assert end["status"] == "running" and end["offset"] == 10  # not terminal: resume from 10
    proc, lines = cli_json("logs", rid, "--offset", 25)  # past what is written so far
    assert chunks_of(lines, validate)[0] == [] and lines[-1]["offset"] == 25
    gate.touch()
    proc, lines = cli_json("logs", rid, "--follow", "--offset", end["offset"], check=0)
    chunks, end = chunks_of(lines, validate)
    assert joined(chunks, 10) == FULL[10:]  # exactly the rest, non-UTF-8 bytes included
    assert end == {"schema": "casruns/log-chunk/v1", "run_id": rid, "stream": "stdout", "offset": len(FULL), "end": True,
                   "status": "succeeded"}
    # finished: the stored log, from any byte (also inside a multi-byte character)
    assert logs_bytes(rid) == FULL
    for k in (0, 1, 10, 11, 16, len(FULL) - 1):
        assert logs_bytes(rid, "--offset", k) == FULL[k:]
        proc, lines = cli_json("logs", rid, "--offset", k, check=0)
        chunks, end = chunks_of(lines, validate)
        assert joined(chunks, k) == FULL[k:] and end["offset"] == len(FULL)
    assert logs_bytes(rid, "--offset", 1000) == b""
    proc, lines = cli_json("logs", rid, "--offset", 1000, check=0)
    assert chunks_of(lines, validate)[0] == [] and lines[-1]["offset"] == len(FULL) and lines[-1]["status"] == "succeeded"
    assert b"".join(registry.log_chunks(rid, offset=11)) == FULL[11:]


@pytest.mark.slow
def test_logs_json_follow_is_contiguous_and_a_reconnection_continues_exactly(registry, validate):
    script = 'for i in 1 2 3 4 5; do printf "part $i \\303"; sleep 0.1; printf "\\251\\377\\n"; sleep 0.1; done'
    rid = registry.submit(["sh", "-c", script])["run_id"]
    proc, lines = cli_json("logs", rid, "--follow", check=0)
    chunks, end = chunks_of(lines, validate)
    full = joined(chunks, 0)
    assert full == b"".join(b"part %d \xc3\xa9\xff\n" % i for i in range(1, 6)) == logs_bytes(rid)
    assert end["offset"] == len(full) and end["status"] == "succeeded"
    assert any(c["encoding"] == "base64" for c in chunks)
    # a consumer that stopped after the first chunks picks up where it stopped, and from any byte
    for k in {chunks[len(chunks) // 2]["offset"], len(full) // 2 + 1}:
        proc, lines = cli_json("logs", rid, "--offset", k, check=0)
        rest, end = chunks_of(lines, validate)
        assert joined(rest, k) == full[k:] and end["offset"] == len(full)


def test_logs_negative_offset_is_invalid_input(registry):
    rid = registry.submit(["true"])["run_id"]
    proc, lines = cli_json("logs", rid, "--offset", "-1")
    assert proc.returncode == 3 and lines[0]["error"]["code"] == "invalid_input"
    proc = cli("logs", rid, "--offset", "-1")
    assert proc.returncode == 3 and proc.stderr.startswith("casruns: error: ") and "offset" in proc.stderr


@pytest.mark.slow
def test_wait_and_follow_work_with_the_polling_fallback(registry, tmp_path, monkeypatch):
    poll = {"CASRUNS_NOTIFY": "poll"}
    rid, gate = gated_run(registry, tmp_path)
    later(gate.touch, 0.5)
    assert logs_bytes(rid, "--follow", env=poll) == FULL
    rid2 = registry.submit(["sh", "-c", "sleep 0.5; echo waited"])["run_id"]
    proc, lines = cli_json("wait", rid2, env=poll, check=0)
    assert lines[0]["status"] == "succeeded"
    monkeypatch.setenv("CASRUNS_NOTIFY", "poll")
    rid3 = registry.submit(["sh", "-c", "echo a; sleep 0.3; echo b"])["run_id"]
    assert b"".join(registry.log_chunks(rid3, follow=True, offset=1)) == b"\nb\n"
    assert [s for s, _ in registry.follow(rid3)] and registry.wait([rid3])[1] is True


@pytest.mark.slow
def test_wait_with_a_long_poll_still_ends_promptly_enough(registry):
    rid = registry.submit(["sh", "-c", "sleep 0.3"])["run_id"]
    records, done = registry.wait([rid], poll=30.0)  # capped at a second: the end itself wakes it
    assert done and records[0]["status"] == "succeeded"


def test_following_a_live_log_with_a_fifo_in_place_of_its_spool_does_not_hang(registry):
    """The live spool is opened like every registry file: a FIFO there is a stray (exit 6 from
    logs), never a read that waits forever for a writer."""
    import subprocess
    import sys

    rid = registry.submit(["sleep", "30"])["run_id"]
    spool = registry.run_dir(rid).spool("stderr")
    poll_until(lambda: registry.get(rid)["status"] == "running", what="running")
    if os.path.exists(spool):
        os.unlink(spool)
    os.mkfifo(spool, 0o600)
    try:
        proc = subprocess.run([sys.executable, "-m", "casruns", "logs", "--json", rid, "--stream", "stderr"],
                              capture_output=True, text=True, timeout=20, env=dict(os.environ, CASRUNS_HOME=str(registry.root)))
        assert proc.returncode == 6 and json.loads(proc.stdout.splitlines()[-1])["error"]["code"] == "stray_file"
    finally:
        registry.cancel(rid)
