"""Faults in manifests and their cache (issue 13, item 2): a silent change is detected, not obeyed.

spec/format.md, "Manifest checksum", "The read cache" and "What each reader trusts". Each fault is
made the way the world makes it: one flipped bit with the file's size (and, for rot, its mtime)
unchanged, a FIFO or a symlink where a file should be, a full disk.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from casruns import manifest as mf
from casruns.cli import fast
from conftest import cli, cli_json
from test_gc import config, finished_run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OLD = "2020-01-01T00:00:00.000000Z"  # long finished: eligible for cleanup unless something keeps it


def flip_bit(path: Path, needle: bytes, offset: int, *, keep_mtime: bool) -> None:
    """Flip bit 0 of byte ``offset`` of the first ``needle`` in ``path``, in place (same inode,
    same size); with ``keep_mtime`` the mtime is put back, as disk rot leaves it."""
    st = path.stat()
    data = path.read_bytes()
    at = data.index(needle) + offset
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([data[at] ^ 1]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert after.st_size == st.st_size and after.st_ino == st.st_ino
    assert (after.st_mtime_ns == st.st_mtime_ns) == keep_mtime


@pytest.fixture
def promoted(registry):
    """A promoted run that retention would remove at once if it were not promoted."""
    config(registry, '[retention]\nsucceeded = "0s"\n')
    rid = finished_run(registry, finished=OLD)
    registry.promote(rid, reason="accepted evidence")
    assert registry.get(rid)["retention"]["promoted"] is True
    return rid


def status_json(rid):
    proc, out = cli_json("status", rid)
    return proc, out[0]


# -- the cache ------------------------------------------------------------------------------------


def test_a_flipped_byte_in_the_cache_changes_neither_status_nor_gc(registry, promoted, validate):
    run = registry.run_dir(promoted)
    cache = Path(run.file("manifest.json"))
    # '"promoted":true' -> '"promotee":true': still JSON, same size and mtime, and the run
    # would read as unpromoted, so eligible for cleanup.
    flip_bit(cache, b'"promoted":true', len('"promote'), keep_mtime=True)
    assert b'"promotee":true' in cache.read_bytes()

    proc, rec = status_json(promoted)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert validate(rec, "run.schema.json")["retention"]["promoted"] is True
    proc, out = cli_json("list", "--promoted")
    assert proc.returncode == 0 and [r["run_id"] for r in validate(out[0], "list.schema.json")["runs"]] == [promoted]
    # the reader fell back to the TOML and rebuilt the cache from it
    assert b'"promoted":true' in cache.read_bytes()

    flip_bit(cache, b'"promoted":true', len('"promote'), keep_mtime=True)
    proc, out = cli_json("gc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert validate(out[0], "reports.schema.json#/$defs/gc")["runs_removed"] == 0
    assert run.exists() and registry.get(promoted)["retention"]["promoted"] is True


def test_a_cache_is_used_only_when_its_checksum_covers_it(tmp_path):
    """The cache's own checksum is over the bytes after its ``"checksum"`` member, reproducible
    from spec/format.md alone; any change there makes readers parse the TOML instead."""
    path = tmp_path / "manifest.toml"
    m = {"schema": mf.SCHEMA, "run_id": "r", "status": "succeeded", "created_at": OLD, "updated_at": OLD,
         "retention": {"promoted": True}}
    mf.write(str(path), m)
    data = (tmp_path / "manifest.json").read_bytes()
    head = b'{"schema":"casruns/manifest-cache/v2","checksum":"blake2b-256:'
    assert data.startswith(head)
    body = data[len(head) + 66 :]
    assert data[len(head) : len(head) + 64].decode() == hashlib.blake2b(body, digest_size=32).hexdigest()
    doc = json.loads(data)
    assert doc["toml"] == "blake2b-256:" + hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
    assert doc["manifest"] == m and doc["tag"][0] == path.stat().st_ino
    for i in range(len(head), len(data)):  # every single-bit flip after the header is caught
        flipped = bytearray(data)
        flipped[i] ^= 1
        assert mf.parse_cache(bytes(flipped)) is None, i


# -- the TOML -------------------------------------------------------------------------------------


def test_a_manifest_checksum_is_reproducible_from_the_spec(registry, promoted):
    """First line ``# checksum: blake2b-256:<hex>``: BLAKE2b-256 of every byte after it."""
    data = Path(registry.run_dir(promoted).manifest_path).read_bytes()
    line, _, body = data.partition(b"\n")
    assert line == b"# checksum: blake2b-256:" + hashlib.blake2b(body, digest_size=32).hexdigest().encode()
    assert b"\n# " not in body  # one comment line, the first


def test_an_edited_manifest_that_still_parses_is_refused_by_every_reader(registry, promoted, validate):
    """'promoted = true' -> 'promotee = true' is one bit and still valid TOML. Any rewrite
    changes the mtime, so no reader takes the cache; each one stops at the checksum."""
    run = registry.run_dir(promoted)
    toml = Path(run.manifest_path)
    flip_bit(toml, b"promoted = true", len("promote"), keep_mtime=False)
    before = toml.read_bytes()
    assert b"promotee = true" in before

    proc, err = status_json(promoted)
    assert proc.returncode == 6
    assert validate(err, "error.schema.json")["error"]["code"] == "manifest_corrupt"
    assert run.manifest_path in err["error"]["message"] and "checksum" in err["error"]["message"]
    proc, out = cli_json("list")
    assert proc.returncode == 6 and [e["code"] for e in validate(out[0], "list.schema.json")["errors"]] == ["manifest_corrupt"]

    proc, out = cli_json("gc")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
    assert promoted in out[0]["error"]["message"] and "gc stopped before sweeping" in out[0]["error"]["message"]
    assert run.exists()

    proc, out = cli_json("verify")
    assert proc.returncode == 14
    report = validate(out[0], "reports.schema.json#/$defs/verify")
    assert [(p["kind"], p["run_id"]) for p in report["problems"]] == [("manifest_checksum", promoted)]

    # no update blesses the damage by rewriting it with a fresh checksum
    proc, out = cli_json("unpromote", promoted, "--reason", "r")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
    assert toml.read_bytes() == before


def test_a_rotted_manifest_is_caught_by_verify_and_updates_even_when_its_cache_is_intact(registry, promoted, validate):
    """Rot keeps size and mtime, so the cache's tag still matches: status may show the cache (it
    was built from the manifest when its checksum held), but what acts on the run reads the TOML."""
    run = registry.run_dir(promoted)
    toml = Path(run.manifest_path)
    flip_bit(toml, b"promoted = true", len("promote"), keep_mtime=True)
    before = toml.read_bytes()

    proc, rec = status_json(promoted)
    assert proc.returncode == 0 and validate(rec, "run.schema.json")["retention"]["promoted"] is True

    proc, out = cli_json("verify", promoted)
    assert proc.returncode == 14
    assert [p["kind"] for p in validate(out[0], "reports.schema.json#/$defs/verify")["problems"]] == ["manifest_checksum"]
    proc, out = cli_json("retain", promoted, "--for", "1d")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
    assert toml.read_bytes() == before


def test_gc_refuses_a_rotted_manifest_even_when_its_cache_is_intact(registry, promoted):
    run = registry.run_dir(promoted)
    flip_bit(Path(run.manifest_path), b"promoted = true", len("promote"), keep_mtime=True)
    proc, out = cli_json("gc")
    assert proc.returncode == 6 and out[0]["error"]["code"] == "manifest_corrupt"
    assert run.exists()


def test_a_damaged_checksum_line_is_corrupt_not_a_manifest_without_checksum(registry, promoted):
    """A flip in the first line must not turn a checked manifest into an unchecked old one."""
    toml = Path(registry.run_dir(promoted).manifest_path)
    good = toml.read_bytes()
    line_len = good.index(b"\n")
    for i in range(line_len + 1):  # its newline too
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            with pytest.raises(mf.CorruptManifest):
                mf.loads(bytes(bad), str(toml))


def test_an_oversized_manifest_is_refused_without_reading_it_all(registry, promoted):
    toml = Path(registry.run_dir(promoted).manifest_path)
    data = toml.read_bytes()
    body = data.partition(b"\n")[2] if data.startswith(b"#") else data  # no checksum, as casruns 0.2 wrote
    toml.write_bytes(body + b"# padding\n" * ((4 << 20) // 10 + 1))  # the limit is 4 MiB
    proc, err = status_json(promoted)
    assert proc.returncode == 6 and err["error"]["code"] == "manifest_corrupt" and "limit" in err["error"]["message"]


# -- strays ---------------------------------------------------------------------------------------


def test_a_fifo_or_symlink_as_manifest_never_hangs_and_is_a_stray(registry, promoted, tmp_path, validate):
    other = finished_run(registry)
    registry.promote(other, reason="kept through the gcs below")
    run = registry.run_dir(promoted)
    toml = Path(run.manifest_path)
    saved = tmp_path / "saved.toml"
    shutil.copy(toml, saved)
    for make in (lambda: os.mkfifo(toml), lambda: toml.symlink_to(saved)):
        toml.unlink()
        make()
        proc, err = status_json(promoted)  # cli's subprocess timeout turns a hang into an error
        assert proc.returncode == 6 and validate(err, "error.schema.json")["error"]["code"] == "stray_file"
        # a directory whose manifest.toml is not a regular file is a stray (spec/format.md,
        # "Strays"): readers skip it, verify reports it, gc reports it and goes on
        proc, out = cli_json("list", timeout=30)
        assert proc.returncode == 0 and [r["run_id"] for r in out[0]["runs"]] == [other]
        proc, out = cli_json("verify", timeout=30)
        assert proc.returncode == 14
        report = validate(out[0], "reports.schema.json#/$defs/verify")
        assert [s["path"] for s in report["strays"]] == [f"runs/{promoted}/manifest.toml"]
        proc, out = cli_json("gc", timeout=30)
        assert proc.returncode == 0 and [s["path"] for s in out[0]["strays"]] == [f"runs/{promoted}/manifest.toml"]
        assert os.path.lexists(toml) and os.path.lexists(saved)


def test_a_fifo_as_cache_never_hangs_and_is_ignored(registry, promoted, validate):
    cache = Path(registry.run_dir(promoted).file("manifest.json"))
    cache.unlink()
    os.mkfifo(cache)
    proc, rec = status_json(promoted)
    assert proc.returncode == 0 and validate(rec, "run.schema.json")["retention"]["promoted"] is True
    proc, out = cli_json("list", timeout=30)
    assert proc.returncode == 0 and [r["run_id"] for r in out[0]["runs"]] == [promoted]
    proc, out = cli_json("verify", timeout=30)
    assert proc.returncode == 0 and out[0]["ok"]


# -- a full disk ----------------------------------------------------------------------------------


def test_status_and_list_work_on_a_full_disk(registry, promoted, monkeypatch, capsys, validate):
    """Rebuilding a lost cache is the only write a read makes; ENOSPC there is swallowed."""
    run = registry.run_dir(promoted)
    os.unlink(run.file("manifest.json"))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    root = ["--root", str(registry.root)]
    try:
        assert fast.try_run(root + ["status", "--json", promoted]) == 0
        assert fast.try_run(root + ["list", "--json"]) == 0
    finally:
        monkeypatch.undo()
        gc.enable()  # the fast path turns the cyclic collector off for its short-lived process
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert validate(lines[0], "run.schema.json")["retention"]["promoted"] is True
    assert [r["run_id"] for r in validate(lines[1], "list.schema.json")["runs"]] == [promoted]
    assert not [n for n in os.listdir(run.path) if n.startswith(".tmp-")]
    assert not os.path.exists(run.file("manifest.json"))


# -- old registries -------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["registry-v1", "registry-v2"])
def test_old_manifests_without_checksum_load_and_verify_counts_them(tmp_path, fixture, validate):
    root = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, root)
    env = {"CASRUNS_HOME": str(root)}
    proc, out = cli_json("list", env=env)
    assert proc.returncode == 0
    ids = sorted(r["run_id"] for r in out[0]["runs"])
    proc, out = cli_json("verify", env=env)
    report = validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 0 and report["ok"] and report["manifests_unchecked"] == len(ids)
    # the next write adds the checksum, keeping every field
    rid = ids[0]
    before = mf.loads((root / "runs" / rid / "manifest.toml").read_bytes())
    assert cli("retain", rid, "--for", "30d", env=env).returncode == 0
    data = (root / "runs" / rid / "manifest.toml").read_bytes()
    assert data.startswith(b"# checksum: blake2b-256:")
    after = mf.loads(data)
    assert after["event_seq"] == 1  # the first change journaled for a run older than events
    assert {k: v for k, v in after.items() if k not in ("retention", "updated_at", "event_seq")} == {
        k: v for k, v in before.items() if k not in ("retention", "updated_at")}
    proc, out = cli_json("verify", env=env)
    assert proc.returncode == 0 and out[0]["manifests_unchecked"] == len(ids) - 1


def test_a_rewrite_by_an_old_casruns_drops_the_checksum_rather_than_leaving_it_stale(registry, promoted):
    """casruns 0.2 rewrites a manifest with tomli_w, which writes no comments: the result is an
    unchecked manifest, never one that looks corrupt."""
    import tomli_w
    import tomllib

    toml = Path(registry.run_dir(promoted).manifest_path)
    m = tomllib.loads(toml.read_text())
    m["labels"] = {"touched": "by 0.2"}
    toml.write_bytes(tomli_w.dumps(m).encode())
    proc, rec = status_json(promoted)
    assert proc.returncode == 0 and rec["labels"] == {"touched": "by 0.2"} and rec["retention"]["promoted"] is True
    proc, out = cli_json("verify", promoted)
    assert proc.returncode == 0 and out[0]["manifests_unchecked"] == 1
