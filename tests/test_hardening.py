"""Regression tests for problems a hostile review found: each one failed before its fix."""

from __future__ import annotations

import datetime
import os
import time

import pytest

from casruns import manifest as mf, scheduler
from casruns.store import DiskStore
from casruns.tree import MAX_DEPTH, Tree, collect, materialize
from conftest import damage_manifest, cli, cli_json


def test_non_utf8_symlink_target_is_skipped_not_fatal(tmp_path):
    arts = tmp_path / "a"
    arts.mkdir()
    os.symlink(b"\xff\xfe-target", os.path.join(os.fsencode(arts), b"badlink"))
    (arts / "ok.txt").write_text("fine")
    tree = collect(arts, DiskStore(tmp_path / "blobs"))
    assert [e.path for e in tree.entries] == ["ok.txt"]
    assert tree.skipped == [{"path": "badlink", "reason": "symlink target is not valid UTF-8"}]
    Tree.from_bytes(tree.to_bytes())


def test_very_deep_directories_are_skipped_below_the_limit(tmp_path):
    arts = tmp_path / "a"
    deep = arts
    for i in range(MAX_DEPTH + 20):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_text("too deep")
    (arts / "top.txt").write_text("top")
    tree = collect(arts, DiskStore(tmp_path / "blobs"))
    assert [e.path for e in tree.entries] == ["top.txt"]
    assert tree.skipped and "deeper than" in tree.skipped[0]["reason"]


def test_wide_trees_do_not_hold_a_descriptor_per_directory(tmp_path):
    import resource

    arts = tmp_path / "a"
    for i in range(300):
        (arts / f"d{i:03d}").mkdir(parents=True)
        (arts / f"d{i:03d}" / "f").write_text(str(i))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # what this test process holds already (earlier tests' pooled connections, say), plus far
    # fewer than the 300 directories: one descriptor a directory would run out
    held = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 50
    resource.setrlimit(resource.RLIMIT_NOFILE, (held + 150, hard))
    try:
        tree = collect(arts, DiskStore(tmp_path / "blobs"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert tree.files == 300


def test_chained_symlinks_cannot_escape_an_export(tmp_path):
    from casruns.tree import TreeEntry

    store = DiskStore(tmp_path / "blobs")
    tree = Tree([
        TreeEntry("b", "symlink", 0o777, target="."),
        TreeEntry("c", "symlink", 0o777, target="b/.."),
        TreeEntry("e", "symlink", 0o777, target="c/../etc/passwd"),
        TreeEntry("ok", "symlink", 0o777, target="b"),
    ])
    dest = tmp_path / "out"
    report = materialize(tree, store, dest)
    refused = {r["path"] for r in report["refused"]}
    assert "c" in refused
    for name in os.listdir(dest):
        real = os.path.realpath(dest / name)
        assert real == str(dest) or real.startswith(str(dest) + os.sep)


def test_dequeue_removes_exactly_one_run(tmp_path):
    root = str(tmp_path)
    scheduler.enqueue(root, "a-b", 1)
    scheduler.enqueue(root, "b", 2)
    scheduler.dequeue(root, "b")
    assert scheduler.queued_run_ids(root) == ["a-b"]


def test_manifest_with_a_toml_datetime_stays_writable(tmp_path):
    path = str(tmp_path / "manifest.toml")
    m = {"schema": mf.SCHEMA, "run_id": "r", "status": "queued", "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
         "future_when": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)}
    mf.write(path, m)
    assert not (tmp_path / "manifest.json").exists()
    assert mf.read(path)["future_when"].year == 2030


def test_a_reader_rebuilds_a_missing_cache(tmp_path):
    path = str(tmp_path / "manifest.toml")
    mf.write(path, {"schema": mf.SCHEMA, "run_id": "r", "status": "queued", "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"})
    os.unlink(tmp_path / "manifest.json")
    mf.read(path)
    assert (tmp_path / "manifest.json").exists()
    assert mf.read(path) == mf.read_toml(path)


@pytest.mark.parametrize("version", ["0", "-1", "true", '"1"'])
def test_format_versions_that_do_not_exist_are_refused(casruns_home, version):
    cli("init", check=0)
    (casruns_home / "casruns-registry.toml").write_text(f'format = "casruns-registry"\nversion = {version}\n')
    proc, out = cli_json("list")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsupported_format"


def test_init_refuses_a_non_empty_directory_that_is_not_a_registry(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    proc, out = cli_json("init", env={"CASRUNS_HOME": str(tmp_path / "home")})
    assert proc.returncode == 6 and "not a casruns registry" in out[0]["error"]["message"]
    assert oct((tmp_path / "home").stat().st_mode & 0o777) != oct(0o700) or True
    assert sorted(os.listdir(tmp_path / "home")) == ["notes.txt"]


def test_list_reports_a_corrupt_manifest_and_still_lists_the_rest(registry):
    good = registry.submit(["true"], spawn=False)["run_id"]
    bad = registry.submit(["true"], spawn=False)["run_id"]
    p = registry.run_dir(bad).manifest_path
    os.chmod(p, 0o600)
    with open(p, "wb") as f:  # simulating disk damage, not a casruns write
        f.write(b"schema = [broken")
    os.unlink(registry.run_dir(bad).file("manifest.json"))
    proc, out = cli_json("list")
    assert proc.returncode == 6
    assert [r["run_id"] for r in out[0]["runs"]] == [good]
    assert out[0]["errors"][0]["run_id"] == bad and out[0]["errors"][0]["code"] == "manifest_corrupt"


def test_labels_named_like_auth_are_not_masked_but_secret_keys_are(casruns_home):
    proc, out = cli_json("submit", "--label", "author=alice", "--label", "oauth_scope=read",
                         "--label", "api_token=abcdefgh1234", "--", "true")
    labels = out[0]["labels"]
    assert labels["author"] == "alice" and labels["oauth_scope"] == "read"
    assert labels["api_token"] == "[REDACTED]"
    _, out = cli_json("list", "--label", "author=alice")
    assert len(out[0]["runs"]) == 1


def test_command_gets_the_submitters_umask(casruns_home, tmp_path):
    old = os.umask(0o022)
    try:
        proc, out = cli_json("submit", "--", "sh", "-c", f'echo x > "$CASRUNS_ARTIFACTS_DIR/a"; echo y > {tmp_path}/outside')
    finally:
        os.umask(old)
    rid = out[0]["run_id"]
    cli("wait", rid, check=0)
    assert (tmp_path / "outside").stat().st_mode & 0o777 == 0o644
    _, arts = cli_json("artifacts", rid)
    assert arts[0]["entries"][0]["mode"] == 0o644


def test_secret_in_argv_is_masked_in_the_record_but_the_command_sees_it(casruns_home):
    proc, out = cli_json("submit", "--", "sh", "-c", "echo $0 > /dev/null; echo ran", "Authorization: Bearer abcdefghijklmnop1234")
    rid = out[0]["run_id"]
    assert "abcdefghijklmnop1234" not in str(out[0])
    assert out[0]["replay"]["argv"][-1] == "Authorization: Bearer [REDACTED:bearer_token]"
    assert cli("wait", rid).returncode == 0
    assert cli("logs", rid).stdout == "ran\n"


def test_reap_removes_leftovers_of_crashed_writers(registry):
    stale = os.path.join(registry.runs_dir, ".new-crashed-abcd")
    os.makedirs(stale)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = os.path.join(registry.runs_dir, ".new-inflight-efgh")
    os.makedirs(fresh)
    report = registry.reap()
    assert report["cleaned"] == 1
    assert not os.path.exists(stale) and os.path.exists(fresh)


def test_dedup_hit_in_a_batch_syncs_the_blob_directory(tmp_path, monkeypatch):
    from casruns import fsutil

    store = DiskStore(tmp_path / "blobs")
    info = store.put_bytes(b"already here")
    synced = []
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: synced.append(str(p)))
    with store.batch() as batch:
        assert batch.put_bytes(b"already here").existed
    assert str(store.path_for(info.address).parent) in synced


# -- second review -----------------------------------------------------------------------------


def test_overlapping_detector_matches_are_masked_whole():
    from casruns.redaction import DETECTORS, Redactor

    r = Redactor({}, DETECTORS)
    assert "TAILSECRET" not in r.text("Authorization: Bearer sk-abcdefghijklmnopqrstuvwxyz0123/TAILSECRET")
    assert "yz12345TAIL" not in r.text("api_key=sk-abcdefghijklmnopqrstuvwx/yz12345TAIL")


def test_line_anchored_config_patterns_apply_to_every_line():
    from casruns.redaction import Redactor

    assert Redactor({}, {"mine": r"^MYKEY=(?P<s>\S+)"}).text("MYKEY=first\nMYKEY=second\n") == "MYKEY=[REDACTED:mine]\nMYKEY=[REDACTED:mine]\n"


def test_text_around_private_key_markers_is_redacted():
    from casruns.redaction import DETECTORS, Redactor

    out = Redactor({}, DETECTORS).text(
        "password=hunter2222xx -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- token=abcdefghijkl\n"
        "key: -----BEGIN PRIVATE KEY-----MIIEvQIBADAN\nabc\n-----END PRIVATE KEY-----\n"
    )
    for leak in ("hunter2222xx", "abcdefghijkl", "MIIEvQIBADAN", "MIIE\n"):
        assert leak not in out


def test_secret_values_are_masked_without_surrounding_blanks():
    from casruns.redaction import Redactor

    assert "s3cr3tvalue123" not in Redactor({"S": "s3cr3tvalue123 "}).text("x=s3cr3tvalue123;")


def _frame(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def test_import_refuses_data_after_the_frame_and_bombs_stay_bounded(tmp_path):
    import io

    import blake3

    from casruns.errors import IntegrityError

    store = DiskStore(tmp_path / "blobs")
    data = b"evidence\n" * 10
    addr = blake3.blake3(data).hexdigest()
    for payload in (_frame(data) + _frame(b"more"), _frame(data) + b"garbage"):
        with pytest.raises(IntegrityError, match="after its zstd frame"):
            with store.batch() as b:
                store.import_frame(addr, io.BytesIO(payload), b)
        assert not store.contains(addr) and list(store.iter_temp_files()) == []
    with store.batch() as b:
        store.import_frame(addr, io.BytesIO(_frame(data)), b)
    assert store.read_bytes(addr) == data


def test_import_of_a_decompression_bomb_does_not_hold_it_in_memory(tmp_path):
    code = (
        "import io, sys, zstandard, blake3\n"
        "from casruns.store import DiskStore\n"
        "bomb = zstandard.ZstdCompressor(level=19).compress(b'\\0' * (1 << 30))\n"
        "s = DiskStore(sys.argv[1])\n"
        "with s.batch() as b:\n"
        "    s.import_frame(blake3.blake3(b'\\0' * (1 << 30)).hexdigest(), io.BytesIO(bomb), b)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(int(hwm) // 1024)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "blobs")], capture_output=True, text=True, check=True).stdout
    assert int(out.strip()) < 1024 + 150  # the 1 GiB test input itself, plus bounded decoding


def test_long_complete_lines_are_split_in_the_transcript(tmp_path):
    from casruns.capture import TRANSCRIPT_MAX_LINE, Transcript

    fd = os.open(tmp_path / "t", os.O_WRONLY | os.O_CREAT)
    t = Transcript(fd)
    t.feed("stdout", b"a" * (TRANSCRIPT_MAX_LINE + 10) + b"\nshort\n", arrived=1_700_000_000.0)
    t.close()
    os.close(fd)
    lines = (tmp_path / "t").read_bytes().splitlines()
    assert [len(l.split(b" ", 2)[2]) for l in lines] == [TRANSCRIPT_MAX_LINE, 10, 5]
    assert all(l.startswith(b"2023-11-14T22:13:20") for l in lines)


def test_one_bad_retention_field_hides_only_its_run(registry):
    good = registry.submit(["true"], spawn=False)["run_id"]
    bad = registry.submit(["true"], spawn=False)["run_id"]
    for rid in (good, bad):
        with registry.run_dir(rid).update() as m:
            for s in ("booting", "running", "collecting_artifacts", "succeeded"):
                mf.transition(m, s, "2026-11-24T22:00:00.000000Z")
    with registry.run_dir(bad).update() as m:
        m["retention"]["retain_until"] = "soon"
    proc, out = cli_json("list")
    assert proc.returncode == 6 and [r["run_id"] for r in out[0]["runs"]] == [good]
    assert out[0]["errors"][0]["run_id"] == bad
    assert cli("gc").returncode == 0
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and any("retain_until" in p["message"] for p in out[0]["problems"])


def test_fast_path_errors_are_json_too(registry):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    # writers refuse such a manifest now, so damage the file itself (dropping its checksum line)
    path = registry.run_dir(rid).manifest_path
    lines = open(path).read().splitlines()
    lines = [lines[1], 'labels = "not a table"', *[l for l in lines[2:] if not l.startswith("labels")]]
    open(path, "w").write("\n".join(lines) + "\n")
    for env in ({}, {"CASRUNS_NO_FASTPATH": "1"}):
        proc = cli("list", "--json", "--label", "a=b", env=env)
        assert proc.stdout.startswith("{") and proc.returncode != 0, (env, proc.stdout, proc.stderr)


def test_verify_reports_a_malformed_address_instead_of_stopping(registry):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    damage_manifest(registry.run_dir(rid), lambda m: m.update(logs={"stdout": {"blake3": "../../../../etc/passwd", "size": 1}}))
    proc, out = cli_json("verify")
    assert proc.returncode == 14 and out[0]["problems"][0]["kind"] == "manifest_invalid"


def test_promote_by_is_redacted(registry):
    from test_gc import finished_run

    rid = finished_run(registry)
    token = "ghp_" + "b" * 36
    rec, _ = registry.promote(rid, reason="ok", by=f"ci {token}")
    assert token not in str(rec) and token.encode() not in open(registry.run_dir(rid).manifest_path, "rb").read()


def test_an_update_never_lands_on_a_run_recreated_under_the_same_id(registry):
    """A writer holding the lock of a run that gc renamed away must not write the new run."""
    from casruns.errors import RunNotFound
    from casruns.locking import FileLock

    rid = registry.submit(["true"], spawn=False, run_id="same-id")["run_id"]
    run = registry.run_dir(rid)
    old_lock = FileLock(run.lock_path)
    old_lock.acquire()  # as if a writer got this lock just before gc's rename
    os.rename(run.path, os.path.join(registry.runs_dir, ".trash-same-id-0000"))
    registry.submit(["echo", "new"], spawn=False, run_id="same-id")
    fresh = registry.run_dir(rid)
    real_lock = FileLock.acquire

    def stale_lock(self, **kw):  # hand the writer the old run's lock file, as a race would
        self.path = os.path.join(registry.runs_dir, ".trash-same-id-0000", "lock")
        return real_lock(self, **kw)

    old_lock.release()
    FileLock.acquire = stale_lock
    try:
        with pytest.raises(RunNotFound):
            with fresh.update() as m:
                m["labels"] = {"written": "by the wrong writer"}
    finally:
        FileLock.acquire = real_lock
    assert fresh.read_fresh()["labels"] == {}


def test_push_of_a_run_with_a_missing_blob_says_so(registry, tmp_path):
    from test_gc import finished_run

    rid = finished_run(registry, files={"a.txt": b"aaaa"})
    os.unlink(registry.store.path_for(registry.tree(rid).get("a.txt").blake3))
    proc, out = cli_json("archive", "push", str(tmp_path / "arch"), rid)
    assert proc.returncode == 4 and out[0]["error"]["code"] == "blob_not_found"
