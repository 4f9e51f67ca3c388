"""The fleet archive (issue 18): where each run ran, and looking into an archive with filters."""

from __future__ import annotations

import json

from conftest import cli


def test_every_run_records_the_registry_and_host_it_ran_on(casruns_home, tmp_path, validate):
    """A fleet archive can say where each run ran (issue 18's first step): runs carry `origin`."""
    import socket

    rid = json.loads(cli("submit", "--json", "--", "true").stdout)["run_id"]
    rec = validate(json.loads(cli("status", "--json", rid).stdout), "run.schema.json")
    reg_id = (casruns_home / "registry-id").read_text().strip()
    assert len(reg_id) == 16 and rec["origin"] == {"registry_id": reg_id, "host": socket.gethostname()}
    cli("wait", rid)
    cli("promote", rid, "--reason", "r", check=0)
    arch = tmp_path / "arch"
    assert cli("archive", "push", str(arch), rid).returncode == 0
    listed = validate(json.loads(cli("archive", "list", "--json", str(arch)).stdout), "reports.schema.json#/$defs/archive_list")
    assert listed["runs"][0]["origin"]["registry_id"] == reg_id
    other = tmp_path / "other"
    assert cli("archive", "pull", str(arch), env={"CASRUNS_HOME": str(other)}).returncode == 0
    pulled = json.loads(cli("status", "--json", rid, env={"CASRUNS_HOME": str(other)}).stdout)
    assert pulled["origin"]["registry_id"] == reg_id != (other / "registry-id").read_text().strip()


def test_archive_list_takes_the_registrys_filters(registry, tmp_path, validate):
    arch = tmp_path / "arch"
    a = registry.submit(["true"], spawn=False, labels={"suite": "unit"})["run_id"]
    b = registry.submit(["true"], spawn=False, labels={"suite": "e2e"})["run_id"]
    for rid in (a, b):
        registry.cancel(rid)
    registry.promote(b, reason="keep")
    assert cli("archive", "push", str(arch), a, b).returncode == 0

    def ids(*args):
        proc = cli("archive", "list", "--json", str(arch), *args)
        assert proc.returncode == 0, proc.stderr
        return [r["run_id"] for r in validate(json.loads(proc.stdout), "reports.schema.json#/$defs/archive_list")["runs"]]

    assert ids() == [b, a]  # newest first
    assert ids("--label", "suite=unit") == [a] and ids("--promoted") == [b] and ids("--not-promoted") == [a]
    assert ids("--status", "cancelled", "--limit", "1") == [b] and ids("--status", "succeeded") == []
    assert ids("--since", "1h") == [b, a] and ids("--since", "2099-01-01T00:00:00Z") == []
    proc = cli("archive", "list", "--json", str(arch), "--status", "bogus")
    assert proc.returncode == 3 and json.loads(proc.stdout)["error"]["code"] == "invalid_input"


def test_an_archived_run_is_read_without_pulling_it_and_verified(registry, tmp_path, validate):
    rid = registry.submit(["sh", "-c", 'echo out; echo err >&2; mkdir -p "$CASRUNS_ARTIFACTS_DIR/d"; printf data > "$CASRUNS_ARTIFACTS_DIR/d/f.txt"'])["run_id"]
    registry.wait([rid], timeout=60)
    registry.promote(rid, reason="keep")
    arch = tmp_path / "arch"
    assert cli("archive", "push", str(arch), rid).returncode == 0
    local = json.loads(cli("status", "--json", rid).stdout)
    remote = validate(json.loads(cli("archive", "status", "--json", str(arch), rid).stdout), "run.schema.json")
    for key in ("run_id", "status", "exit_code", "labels", "logs", "artifacts", "origin", "finished_at"):
        assert remote[key] == local[key], key
    tree = validate(json.loads(cli("archive", "artifacts", "--json", str(arch), rid).stdout), "reports.schema.json#/$defs/artifacts")
    assert tree == json.loads(cli("artifacts", "--json", rid).stdout)
    assert cli("archive", "logs", str(arch), rid).stdout == "out\n"
    assert cli("archive", "logs", str(arch), rid, "--stream", "stderr").stdout == "err\n"
    assert cli("archive", "cat", str(arch), rid, "d/f.txt").stdout == "data"
    proc = cli("archive", "cat", "--json", str(arch), rid, "nope.txt")
    assert proc.returncode == 4 and json.loads(proc.stdout)["error"]["code"] == "artifact_not_found"
    proc = cli("archive", "status", "--json", str(arch), "../etc")
    assert proc.returncode == 3 and json.loads(proc.stdout)["error"]["code"] == "invalid_run_id"
    # one flipped byte in the archived log: the read fails (exit 7), as a local cat would
    address = local["logs"]["stdout"]["blake3"]
    blob = arch / "blobs" / address[:2] / address[2:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    proc = cli("archive", "logs", "--json", str(arch), rid)
    assert proc.returncode == 7 and json.loads(proc.stdout.splitlines()[-1])["error"]["code"] == "integrity_error"


def test_push_watch_pushes_runs_as_they_finish_and_resumes_after_a_kill(casruns_home, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import poll_until

    arch = tmp_path / "arch"
    first = json.loads(cli("submit", "--json", "--", "echo", "before").stdout)["run_id"]
    cli("wait", first)

    def archived():
        proc = cli("archive", "list", "--json", str(arch))
        return {r["run_id"]: r for r in json.loads(proc.stdout)["runs"]} if proc.returncode == 0 else {}

    def start():
        return subprocess.Popen([sys.executable, "-m", "casruns", "archive", "push", "--json", str(arch), "--watch"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))

    watcher = start()
    try:
        poll_until(lambda: first in archived(), what="the catch-up push of a run finished before the watch")
        second = json.loads(cli("submit", "--json", "--", "echo", "during").stdout)["run_id"]
        poll_until(lambda: second in archived(), what="a run pushed as it finished")
    finally:
        watcher.send_signal(signal.SIGKILL)
        watcher.wait()
    third = json.loads(cli("submit", "--json", "--", "echo", "while stopped").stdout)["run_id"]
    cli("wait", third)
    cli("promote", second, "--reason", "keep", check=0)
    watcher = start()
    try:
        # resumed from its cursor: the run finished while it was down, and the promotion, reach the archive
        poll_until(lambda: third in archived() and archived()[second]["promoted"], what="changes made while the watcher was down")
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait()
    assert cli("verify", "--against", str(arch)).returncode == 0
    assert cli("archive", "cat", str(arch), third, "nope").returncode == 4
    assert cli("archive", "logs", str(arch), third).stdout == "while stopped\n"


def test_temps_of_the_registry_id_and_the_journal_reserves_are_cleaned_once_their_writer_is_gone(registry, casruns_home):
    import os
    import time

    registry.submit(["true"], spawn=False)
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    stale = [casruns_home / f".tmp-registry-id-{dead}-abcdef012345", casruns_home / "events" / f".tmp-reserve-{dead}-abcdef012345"]
    alive = casruns_home / f".tmp-registry-id-{os.getpid()}-abcdef012345"
    old = time.time() - 7200
    for p in [*stale, alive]:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    assert json.loads(cli("reap", "--json").stdout)["cleaned"] >= 2
    assert not any(p.exists() for p in stale) and alive.exists()
    assert (casruns_home / "registry-id").exists() and (casruns_home / "events" / "reserve").exists()
