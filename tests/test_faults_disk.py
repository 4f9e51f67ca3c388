"""A full disk: the supervisor records its own end, reads never need free space, and nothing
captured is lost. The real-disk tier runs on a small tmpfs mounted for the test (root only, as
CI runs); the fault-point tier (``supervisor_collect=enospc``) runs everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import cli, cli_json, fill_disk, poll_until

pytestmark = pytest.mark.slow


def status(rid, env=None) -> dict:
    proc, out = cli_json("status", rid, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out[0]


def wait_terminal(rid, timeout=60) -> dict:
    return poll_until(lambda: (s := status(rid))["terminal"] and s, timeout=timeout, what=f"{rid} terminal")


@pytest.fixture
def small_fs(tmp_path):
    """A fresh tmpfs of a few MiB; ``resize(n)`` grows it, as freeing space elsewhere would."""
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "fs", 8) as mnt:
        yield _FS(mnt)


def _FS(mnt: Path):
    """The tmpfs at ``mnt`` with what the tests do to it."""

    class FS:
        path = mnt

        @staticmethod
        def resize(mib: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mnt)], check=True)

        @staticmethod
        def free() -> int:
            st = os.statvfs(mnt)
            return st.f_bavail * st.f_frsize

        @staticmethod
        def fill(name: str = "filler") -> Path:
            """Take every free byte, as another program would."""
            return fill_disk(mnt / name)

    return FS


def test_a_run_that_fills_the_disk_ends_failed_no_space_and_keeps_its_output(small_fs, monkeypatch, tmp_path, validate):
    home = small_fs.path / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    pidfile = tmp_path / "cmd.pid"
    # incompressible output, far more than the disk holds; the command never ends by itself
    script = f'echo $$ > {pidfile}; while :; do head -c 1000000 /dev/urandom | base64; done'
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", script, check=0).stdout)["run_id"]
    final = validate(wait_terminal(rid), "run.schema.json")
    assert final["status"] == "failed" and final["error"]["code"] == "no_space", final
    pid = int(pidfile.read_text())
    poll_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the command was stopped")
    # while the disk is full: every read answers, writes fail cleanly
    assert cli("status", rid).returncode == 0
    proc, out = cli_json("list")
    assert proc.returncode == 0 and [r["run_id"] for r in out[0]["runs"]] == [rid]
    assert cli("wait", rid, "--timeout", "5").returncode == 10
    small_fs.fill()
    for args in (["status", rid], ["list"], ["wait", rid, "--timeout", "5"], ["artifacts", rid]):
        proc = cli(*args)
        assert proc.returncode in (0, 10), (args, proc.returncode, proc.stderr)
    head = cli("logs", rid).stdout[:200]  # output captured until the disk filled is readable
    assert len(head) == 200
    proc, out = cli_json("promote", rid, "--reason", "keep the evidence")
    if proc.returncode != 0:  # no room for the manifest rewrite: a clean, single-line error
        assert proc.returncode == 6 and out[0]["error"]["code"] == "no_space", proc.stdout
        assert len(cli("promote", rid, "--reason", "x").stderr.strip().splitlines()) == 1
    proc, out = cli_json("reap")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    validate(out[0], "reports.schema.json#/$defs/reap")
    assert rid in out[0]["pending"] + out[0]["collected"]
    # space comes back: reap stores the spooled output and verify is clean
    (small_fs.path / "filler").unlink()
    small_fs.resize(64)
    proc, out = cli_json("reap", check=0)
    if rid in out[0]["collected"] or status(rid)["logs"]["stdout"]:
        rec = status(rid)
        assert rec["logs"]["stdout"]["size"] > 1_000_000
        assert cli("logs", rid).stdout[:200] == head
    assert json.loads(cli("verify", "--json", "--read-data").stdout)["ok"] is True
    assert not list((home / "blobs" / "tmp").iterdir())  # no partial blob left behind


def test_status_and_list_answer_on_a_disk_full_to_the_last_byte_even_for_a_lost_run(small_fs, monkeypatch):
    home = small_fs.path / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "echo hello; sleep 300", check=0).stdout)["run_id"]
    m = poll_until(lambda: (s := status(rid))["status"] == "running" and s, what="running")
    import tomllib

    sup = tomllib.loads((home / "runs" / rid / "manifest.toml").read_text())["supervisor"]["pid"]
    small_fs.fill()
    os.kill(sup, signal.SIGKILL)  # the supervisor dies while the disk is full
    poll_until(lambda: not os.path.exists(f"/proc/{sup}"), what="supervisor gone")
    proc, out = cli_json("status", rid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc, out = cli_json("list")
    assert proc.returncode == 0 and out[0]["runs"][0]["run_id"] == rid
    (small_fs.path / "filler").unlink()
    final = wait_terminal(rid)  # with space back, the next read reaps it
    assert final["status"] == "failed" and final["error"]["code"] == "supervisor_lost"
    assert cli("logs", rid).stdout == "hello\n"


def test_collection_that_finds_the_disk_full_defers_to_reap_and_loses_nothing(casruns_home, validate):
    """The fault-point tier: the same path without a real full disk (runs everywhere)."""
    rid = json.loads(
        cli("submit", "--json", "--", "sh", "-c", 'echo kept; echo art > "$CASRUNS_ARTIFACTS_DIR/a.txt"',
            env={"CASRUNS_TEST_FAULT": "supervisor_collect=enospc"}, check=0).stdout
    )["run_id"]
    final = validate(wait_terminal(rid), "run.schema.json")
    assert final["status"] == "failed" and final["error"]["code"] == "no_space"
    assert final["exit_code"] == 0 and final["logs"]["stdout"] is None
    assert (casruns_home / "runs" / rid / "spool" / "stdout").read_text() == "kept\n"
    assert cli("logs", rid, check=0).stdout == "kept\n"  # read from the spool meanwhile
    proc, out = cli_json("reap", check=0)
    assert out[0]["collected"] == [rid] and out[0]["pending"] == []
    rec = status(rid)
    assert rec["logs"]["stdout"]["size"] == 5 and rec["artifacts"]["files"] == 1
    assert cli("cat", rid, "a.txt", check=0).stdout == "art\n"
    assert not (casruns_home / "runs" / rid / "spool").exists()
    assert json.loads(cli("verify", "--json").stdout)["ok"] is True


def test_a_run_with_output_still_pending_is_not_archived(casruns_home, tmp_path):
    rid = json.loads(cli("submit", "--json", "--", "echo", "kept", env={"CASRUNS_TEST_FAULT": "supervisor_collect=enospc"}, check=0).stdout)["run_id"]
    assert wait_terminal(rid)["error"]["code"] == "no_space"
    proc, out = cli_json("archive", "push", str(tmp_path / "arch"), rid)
    assert proc.returncode == 3 and "reap" in out[0]["error"]["message"]
    cli("reap", check=0)
    assert cli("archive", "push", str(tmp_path / "arch"), rid).returncode == 0


def test_gc_frees_space_on_a_full_disk_while_a_run_is_active(small_fs, monkeypatch):
    home = small_fs.path / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    cli("init", check=0)
    (home / "config.toml").write_text('gc_grace = "0s"\n[retention]\nfailed = "0s"\n')
    expired = []
    for i in range(3):  # incompressible logs, kept in the store until gc removes their runs
        rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "head -c 600000 /dev/urandom | base64; exit 3", check=0).stdout)["run_id"]
        expired.append(rid)
        assert wait_terminal(rid)["status"] == "failed"
    active = json.loads(cli("submit", "--json", "--", "sh", "-c", "echo alive; sleep 60", check=0).stdout)["run_id"]
    poll_until(lambda: status(active)["status"] == "running", what="active run")
    small_fs.fill()
    before = small_fs.free()
    proc, out = cli_json("gc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out[0]["runs_removed"] == 3 and out[0]["blobs_removed"] >= 3
    assert small_fs.free() > before + 2_000_000
    # the removals were journaled on the full disk (the journal's reserve made room): spec/events.md
    removed = [json.loads(l) for l in cli("events", "--json", "--type", "removed").stdout.splitlines()]
    assert sorted(e["run_id"] for e in removed) == sorted(expired)
    assert status(active)["status"] == "running"
    cli("cancel", active, check=0)
    final = wait_terminal(active)
    assert final["status"] == "cancelled" and cli("logs", active).stdout.startswith("alive")


def test_a_run_does_not_start_without_room_to_record_its_end(small_fs, monkeypatch, tmp_path):
    home = small_fs.path / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    cli("init", check=0)
    filler = small_fs.fill()
    os.truncate(filler, os.path.getsize(filler) - 200_000)  # room for a manifest, not for the reserve
    marker = tmp_path / "ran"
    rid = json.loads(cli("submit", "--json", "--", "touch", str(marker), check=0).stdout)["run_id"]
    final = wait_terminal(rid)
    assert final["status"] == "failed" and final["error"]["code"] == "no_space", final
    assert not marker.exists()


def test_a_filesystem_that_cannot_preallocate_still_runs_commands(casruns_home, monkeypatch):
    """Only a full disk keeps a run from starting: an EOPNOTSUPP from posix_fallocate (some
    filesystems) must not fail every run."""
    import errno

    from casruns import supervisor as sup_mod

    class FakeSup:
        reserve_path = str(casruns_home / "reserve-probe")

        def release_reserve(self):
            return True

    def refuse(fd, off, n):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    casruns_home.mkdir(parents=True, exist_ok=True)
    assert sup_mod.Supervisor.take_reserve(FakeSup()) is True

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert sup_mod.Supervisor.take_reserve(FakeSup()) is False
