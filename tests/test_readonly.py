"""Every read-only command works on a read-only copy of a registry (an archived disk, a snapshot
mounted read-only), with stale or missing read caches (issue 14, item 10). The tier bind-mounts
the registry read-only, which needs root (CI runs as root); it skips, saying so, otherwise."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import cli, read_only_view

pytestmark = pytest.mark.slow


@pytest.fixture
def ro_registry(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")  # before building anything
    src = tmp_path / "src"
    home = src / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", 'echo hi; echo a > "$CASRUNS_ARTIFACTS_DIR/a.txt"', check=0).stdout)["run_id"]
    cli("wait", rid, check=0)
    cli("promote", rid, "--reason", "evidence", check=0)
    for cache in home.glob("runs/*/manifest.json"):
        cache.unlink()  # missing caches: a reader must not need to write them
    with read_only_view(src, tmp_path / "ro") as ro:
        monkeypatch.setenv("CASRUNS_HOME", str(ro / "reg"))
        assert subprocess.run(["touch", str(ro / "reg" / "probe")], capture_output=True).returncode != 0
        yield rid, tmp_path


def test_read_only_commands_work_on_a_read_only_registry(ro_registry, validate):
    rid, tmp = ro_registry
    arch = tmp / "arch"
    commands = [
        (["status", rid], "run.schema.json"),
        (["list"], "list.schema.json"),
        (["list", "--chain", rid], "list.schema.json"),
        (["wait", rid], "run.schema.json"),
        (["artifacts", rid], "reports.schema.json#/$defs/artifacts"),
        (["verify"], "reports.schema.json#/$defs/verify"),
        (["verify", "--read-data", rid], "reports.schema.json#/$defs/verify"),
        (["scan"], "reports.schema.json#/$defs/scan"),
        (["export", rid, str(tmp / "out")], "reports.schema.json#/$defs/export"),
        (["archive", "push", str(arch), rid], "reports.schema.json#/$defs/archive_push"),
        (["archive", "list", str(arch)], "reports.schema.json#/$defs/archive_list"),
        (["verify", "--against", str(arch), "--read-data", rid], "reports.schema.json#/$defs/verify"),
    ]
    for args, schema in commands:
        n = 2 if args[0] == "archive" else 1
        proc = cli(*args[:n], "--json", *args[n:])
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        doc = json.loads(proc.stdout.splitlines()[0])
        validate(doc, schema)
        if args[0] == "verify":
            assert doc["ok"] is True, (args, doc)
    assert cli("logs", rid, check=0).stdout == "hi\n"
    assert cli("cat", rid, "a.txt", check=0).stdout == "a\n"
    assert json.loads(cli("status", rid, "--json").stdout)["retention"]["promoted"] is True


def test_writes_to_a_read_only_registry_fail_with_one_clear_line(ro_registry):
    rid, tmp = ro_registry
    for args in (["unpromote", rid, "--reason", "x"], ["retain", rid, "--for", "30d"], ["submit", "--", "true"], ["cancel", rid]):
        proc = cli(*args)
        assert proc.returncode == 6 or (args[0] == "cancel" and proc.returncode in (0, 5)), (args, proc.returncode, proc.stderr)
        if proc.returncode:
            assert len(proc.stderr.strip().splitlines()) == 1 and "internal error" not in proc.stderr, proc.stderr


def test_a_lost_run_on_a_read_only_registry_does_not_fail_the_readers(tmp_path, monkeypatch):
    """Hostile review: one lost active run made status, list and wait exit 6 on a snapshot."""
    import signal
    import tomllib

    from conftest import poll_until

    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")
    src = tmp_path / "src"
    home = src / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "echo started; sleep 300", check=0).stdout)["run_id"]
    poll_until(lambda: json.loads(cli("status", rid, "--json").stdout)["status"] == "running", what="running")
    m = tomllib.loads((home / "runs" / rid / "manifest.toml").read_text())
    os.kill(m["supervisor"]["pid"], signal.SIGKILL)
    def gone(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    poll_until(lambda: gone(m["supervisor"]["pid"]), what="supervisor gone")
    try:
        with read_only_view(src, tmp_path / "ro") as ro:
            monkeypatch.setenv("CASRUNS_HOME", str(ro / "reg"))
            assert cli("status", rid, "--json").returncode == 0
            proc = cli("list", "--json")
            assert proc.returncode == 0 and json.loads(proc.stdout)["runs"][0]["run_id"] == rid
            assert cli("wait", rid, "--timeout", "1").returncode == 13
    finally:
        try:
            os.killpg(m["process"]["pgid"], signal.SIGKILL)  # the reader's reap may have ended it already
        except ProcessLookupError:
            pass


def test_a_read_only_registry_without_a_registry_id_still_pushes_to_an_archive(tmp_path, monkeypatch):
    """A registry made before registry ids existed, mounted read-only, cannot get an id: the
    archive's lease and records name it by a digest of its path instead of failing the push."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")
    src = tmp_path / "src"
    home = src / "reg"
    monkeypatch.setenv("CASRUNS_HOME", str(home))
    rid = json.loads(cli("submit", "--json", "--", "sh", "-c", "echo old", check=0).stdout)["run_id"]
    cli("wait", rid, check=0)
    (home / "registry-id").unlink()  # as casruns 0.4 and older left it
    with read_only_view(src, tmp_path / "ro") as ro:
        monkeypatch.setenv("CASRUNS_HOME", str(ro / "reg"))
        arch = tmp_path / "arch"
        proc = cli("archive", "push", "--json", str(arch), rid)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["runs"] == 1 and not (ro / "reg" / "registry-id").exists()
        assert cli("archive", "logs", str(arch), rid, check=0).stdout == "old\n"
