"""Another local user controls (part of) the registry: casruns must refuse it, and never write
through a name that was turned into a symlink (issue 14, item 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import cli, cli_json, poll_until


def test_a_registry_root_writable_by_others_is_refused(registry, casruns_home):
    os.chmod(casruns_home, 0o777)
    proc, out = cli_json("list")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsafe_registry", proc.stdout
    assert "writable by group or others" in out[0]["error"]["message"]
    plain = cli("status", "01ABC")
    assert plain.returncode == 6 and len(plain.stderr.strip().splitlines()) == 1
    ok = cli("list", "--json", env={"CASRUNS_ALLOW_UNSAFE_ROOT": "1"})
    assert ok.returncode == 0, ok.stderr


def test_a_registry_directory_replaced_by_a_symlink_is_refused(registry, casruns_home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (casruns_home / "slots").rmdir()
    (casruns_home / "slots").symlink_to(elsewhere)
    proc, out = cli_json("submit", "--", "true")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsafe_registry"
    assert not list(elsewhere.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the root to another user needs root (CI runs as root)")
def test_a_registry_root_owned_by_another_user_is_refused(registry, casruns_home):
    os.chown(casruns_home, 65534, 65534)
    try:
        proc, out = cli_json("list")
        assert proc.returncode == 6 and out[0]["error"]["code"] == "unsafe_registry"
        assert "owned by uid 65534" in out[0]["error"]["message"]
    finally:
        os.chown(casruns_home, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["slots/0.lock", "locks/scheduler.lock"])
def test_a_lock_name_planted_as_a_symlink_never_touches_its_target(registry, casruns_home, tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    link = casruns_home / planted
    link.parent.mkdir(exist_ok=True)
    if link.exists():
        link.unlink()
    link.symlink_to(victim)
    env = {"CASRUNS_ALLOW_UNSAFE_ROOT": "1"}  # even when the user opts in, no symlink is followed
    proc, out = cli_json("submit", "--", "true", env=env)
    rid = out[0]["run_id"] if proc.returncode == 0 else None
    if rid:
        final = poll_until(lambda: (r := json.loads(cli("status", rid, "--json", env=env).stdout))["terminal"] and r, what="terminal")
        assert final["status"] == "failed" and "symlink" in final["error"]["message"], final
    else:
        assert out[0]["error"]["code"] == "stray_file", proc.stdout
    assert victim.read_text() == "precious\n"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert link.is_symlink()


def test_a_planted_heartbeat_symlink_is_not_followed(tmp_path):
    from casruns import fsutil

    victim = tmp_path / "victim"
    victim.write_text("x")
    os.utime(victim, (1_000_000, 1_000_000))
    (tmp_path / "heartbeat").symlink_to(victim)
    fsutil.touch(tmp_path / "heartbeat")
    assert victim.stat().st_mtime == 1_000_000


# -- export never writes through what already stands in DEST (issue 14, item 2) -----------


def _finished(registry, tmp_path):
    from casruns import fsutil  # noqa: F401

    rid = registry.submit(["sh", "-c", 'echo out; echo art > "$CASRUNS_ARTIFACTS_DIR/a.txt"'])["run_id"]
    records, done = registry.wait([rid], timeout=60)
    assert done and records[0]["status"] == "succeeded"
    return rid


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["run.json", "artifacts", "logs"])
def test_export_refuses_a_planted_symlink_at_the_top_of_dest(registry, tmp_path, planted):
    rid = _finished(registry, tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    (dest / planted).symlink_to(victim if planted == "run.json" else outside)
    proc, out = cli_json("export", rid, str(dest))
    assert proc.returncode == 3, proc.stdout
    assert "already exists" in out[0]["error"]["message"]
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert sorted(p.name for p in dest.iterdir()) == [planted]  # no staging directory left behind


@pytest.mark.slow
def test_export_refuses_a_dest_that_is_a_symlink_and_writes_a_fresh_one_whole(registry, tmp_path):
    rid = _finished(registry, tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    proc, out = cli_json("export", rid, str(tmp_path / "link"))
    assert proc.returncode == 3 and out[0]["error"]["code"] == "unsafe_path"
    assert not list(real.iterdir())
    proc, out = cli_json("export", rid, str(tmp_path / "fresh"), check=0)
    assert out[0]["refused"] == []
    assert (tmp_path / "fresh" / "artifacts" / "a.txt").read_text() == "art\n"
    assert (tmp_path / "fresh" / "logs" / "stdout.log").read_text() == "out\n"
    assert json.loads((tmp_path / "fresh" / "run.json").read_text())["run_id"] == rid
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["artifacts", "logs", "run.json"]


# -- low items of issue 14 ------------------------------------------------------------------


def test_archive_push_never_writes_through_a_symlinked_directory_in_the_archive(tmp_path):
    from casruns import Registry
    from test_gc import finished_run

    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"a.txt": b"artifact"})
    dest = tmp_path / "arch"
    reg.archive_push(str(dest), [rid])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = next(p for p in (dest / "blobs").iterdir() if p.is_dir())
    for f in shard.iterdir():
        f.unlink()
    shard.rmdir()
    shard.symlink_to(elsewhere)
    proc, out = cli_json("archive", "push", str(dest), rid, "--verify-existing", env={"CASRUNS_HOME": str(reg.root)})
    assert proc.returncode == 6 and out[0]["error"]["code"] == "stray_file", proc.stdout
    assert not list(elsewhere.iterdir())


def test_reap_removes_a_symlinked_workspace_once_not_forever(registry, tmp_path):
    from test_gc import finished_run

    rid = finished_run(registry)
    run = registry.run_dir(rid)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    os.symlink(target, run.artifacts_dir)
    assert registry.reap()["cleaned"] == 1
    assert registry.reap()["cleaned"] == 0
    assert (target / "keep.txt").read_text() == "keep"


@pytest.mark.slow
def test_a_non_utf8_argv_runs_exactly_and_is_not_called_a_secret(registry, casruns_home):
    import subprocess, sys

    arg = b"caf\xe9"  # latin-1, not UTF-8
    proc = subprocess.run([sys.executable, "-m", "casruns", "submit", "--json", "--", "printf", "%s", arg], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    rid = json.loads(proc.stdout)["run_id"]
    registry.wait([rid], timeout=60)
    assert subprocess.run([sys.executable, "-m", "casruns", "logs", rid], capture_output=True).stdout == arg
    req = registry.manifest(rid)["request"]
    assert req.get("argv_lossy") is True and not req.get("argv_redacted")
    proc, out = cli_json("replay", rid)
    assert proc.returncode == 3 and "not UTF-8" in out[0]["error"]["message"]
