"""Archive faults (issue 13, items 11 and 12a): bit rot in an archive, full disks on either side,
and non-regular files where archived objects should be. Each runs against a directory archive
and the moto S3 server (tests/test_archive.py) where the fault can happen there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from casruns import Registry
from casruns import archive as archmod
from conftest import cli, cli_json
from test_archive import archive, read_obj, s3_server, write_obj  # noqa: F401 - fixtures
from test_gc import finished_run


def home(reg: Registry) -> dict:
    return {"CASRUNS_HOME": str(reg.root)}


def flip(archive, key: str) -> bytes:
    """Flip one bit in the middle of an archived object, keeping its size; the bad bytes."""
    raw = bytearray(read_obj(archive, key))
    raw[len(raw) // 2] ^= 0x10
    write_obj(archive, key, bytes(raw))
    return bytes(raw)


def key_of(address: str) -> str:
    return f"blobs/{address[:2]}/{address[2:]}"


def local_objects(root: Path) -> tuple[list[str], list[Path]]:
    """(addresses of the blobs under their final names, every other file) in a directory archive."""
    blobs, others = [], []
    for p in root.rglob("*"):
        if p.is_dir():
            continue
        rel = p.relative_to(root).parts
        if len(rel) == 3 and rel[0] == "blobs" and len(rel[1]) == 2 and len(rel[2]) == 62:
            blobs.append(rel[1] + rel[2])
        elif len(rel) == 2 and rel[0] == "index" and rel[1].endswith(".ndjson") and not rel[1].startswith(".tmp-"):
            continue  # push's index segment (a whole object like any other)
        elif not (len(rel) == 3 and rel[0] == "runs" and rel[2] == "manifest.toml") and rel not in (("casruns-archive.toml",), (".cas-lock",)):
            others.append(p)
    return blobs, others


def assert_no_partial_objects(root: Path) -> None:
    """Every object under a final name is whole and verifies; no temp is left behind."""
    blobs, others = local_objects(root)
    assert others == []
    remote = archmod.LocalRemote(str(root))
    assert {a: archmod.check_archived(remote, a) for a in blobs} == {a: None for a in blobs}


def assert_registry_clean(reg: Registry, pulled: list[str]) -> None:
    """What a failed pull leaves: its whole runs, each verifying; no temp, no half-made run."""
    assert sorted(r["run_id"] for r in reg.list()) == sorted(pulled)
    assert reg.verify(read_data=True)["ok"]
    assert list(reg.store.iter_temp_files()) == []
    assert [n for n in os.listdir(reg.runs_dir) if n.startswith(".new-")] == []


# -- item 11: a flipped bit of the same size -----------------------------------------------------


def test_verify_against_read_data_finds_a_flipped_bit_of_the_same_size(tmp_path, archive):
    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"numbers.txt": "".join(f"{i}\n" for i in range(20000)).encode()})
    reg.archive_push(archive["url"], [rid])
    target = reg.tree(rid).get("numbers.txt").blake3
    flip(archive, key_of(target))
    # sizes still match: the fast comparison sees nothing, by design
    assert archmod.compare(reg, archive["url"], [rid]) == []
    problems = archmod.compare(reg, archive["url"], [rid], read_data=True)
    assert [(p["kind"], p["run_id"], p.get("address")) for p in problems] == [("archive_corrupt", rid, target)]


def test_archived_blobs_are_re_hashed_streaming_in_bounded_pieces(tmp_path, monkeypatch):
    """verify --against --read-data and push --verify-existing never hold a whole archived blob."""
    reg = Registry(tmp_path / "A")
    big = os.urandom(5 << 20)
    rid = finished_run(reg, files={"big.bin": big})
    dest = str(tmp_path / "archive")
    reg.archive_push(dest, [rid])
    reads = []
    real_open = archmod.LocalRemote.open

    class Counted:  # the reads of blobs (a manifest or the marker is read whole)
        def __init__(self, f, key):
            self.f, self.key = f, key

        def read(self, n=-1):
            if self.key.startswith("blobs/"):
                reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(archmod.LocalRemote, "open", lambda self, key: Counted(real_open(self, key), key))
    assert archmod.compare(reg, dest, [rid], read_data=True) == []
    assert reads and all(0 < n <= archmod.CHUNK for n in reads)
    reads.clear()
    report = archmod.push(reg, dest, [rid], verify_existing=True)
    assert report["blobs_replaced"] == 0 and report["blobs_verified"] == report["blobs_skipped"]
    assert reads and all(0 < n <= archmod.CHUNK for n in reads)


def test_cli_verify_against_read_data_reports_archive_corrupt(tmp_path, archive, validate):
    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"numbers.txt": "".join(f"{i}\n" for i in range(20000)).encode()})
    reg.archive_push(archive["url"], [rid])
    target = reg.tree(rid).get("numbers.txt").blake3
    flip(archive, key_of(target))
    proc, out = cli_json("verify", "--against", archive["url"], "--read-data", rid, env=home(reg))
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14
    assert [(p["kind"], p.get("address")) for p in out[0]["problems"]] == [("archive_corrupt", target)]


def test_push_verify_existing_replaces_a_bad_copy_and_plain_push_stays_size_only(tmp_path, archive, validate):
    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"numbers.txt": "".join(f"{i}\n" for i in range(20000)).encode(), "b.txt": b"bee\n"})
    _, out = cli_json("archive", "push", archive["url"], rid, env=home(reg))
    n = out[0]["blobs_sent"]
    target = reg.tree(rid).get("numbers.txt").blake3
    bad = flip(archive, key_of(target))
    # without --verify-existing: as fast as before, sizes only; the bad copy stays
    proc, out = cli_json("archive", "push", archive["url"], rid, env=home(reg))
    assert proc.returncode == 0
    rep = validate(out[0], "reports.schema.json#/$defs/archive_push")
    assert (rep["blobs_skipped"], rep["blobs_sent"], rep["blobs_verified"], rep["blobs_replaced"]) == (n, 0, 0, 0)
    assert read_obj(archive, key_of(target)) == bad
    # with it: every archived blob re-read, the bad one overwritten with the registry's copy
    proc, out = cli_json("archive", "push", archive["url"], rid, "--verify-existing", env=home(reg))
    assert proc.returncode == 0, out
    rep = validate(out[0], "reports.schema.json#/$defs/archive_push")
    assert (rep["blobs_verified"], rep["blobs_replaced"], rep["blobs_sent"], rep["blobs_skipped"]) == (n, 1, 1, n - 1)
    assert read_obj(archive, key_of(target)) == reg.store.path_for(target).read_bytes()
    assert archmod.compare(reg, archive["url"], [rid], read_data=True) == []
    other = Registry(tmp_path / "B")
    assert other.archive_pull(archive["url"], [rid])["runs"] == 1
    assert b"".join(other.cat(rid, "numbers.txt")) == b"".join(reg.cat(rid, "numbers.txt"))
    # a copy of the wrong size is replaced by any push, and counted as replaced
    write_obj(archive, key_of(target), bad[:-3])
    _, out = cli_json("archive", "push", archive["url"], rid, env=home(reg))
    assert (out[0]["blobs_replaced"], out[0]["blobs_verified"]) == (1, 0)
    assert archmod.compare(reg, archive["url"], [rid], read_data=True) == []
    if "path" in archive:
        assert_no_partial_objects(tmp_path / "archive")


# -- item 12a: a full disk -----------------------------------------------------------------------


def three_runs(reg: Registry, size: int = 2000, random: bool = False) -> list[str]:
    def data(k, i):
        return os.urandom(size) if random else f"run {k} file {i}\n".encode() * (size // 16)

    return [finished_run(reg, files={f"f{i}.bin": data(k, i) for i in range(3)}, stdout=f"run {k}\n".encode()) for k in range(3)]


def test_pull_stopped_by_a_full_disk_reports_no_space_and_the_runs_it_pulled(tmp_path, archive, validate):
    a = Registry(tmp_path / "A")
    ids = three_runs(a)
    a.archive_push(archive["url"], ids)
    b = Registry(tmp_path / "B")
    env = {**home(b), "CASRUNS_TEST_FAULT": "archive_pull_after_first_run=enospc"}
    proc, out = cli_json("archive", "pull", archive["url"], *ids, env=env)
    assert proc.returncode == 6 and len(out) == 1, (proc.stdout, proc.stderr)
    err = validate(out[0], "error.schema.json")["error"]
    assert err["code"] == "no_space" and str(b.root) in err["message"] and ids[1] in err["message"]
    report = validate(err["details"]["report"], "reports.schema.json#/$defs/archive_pull")
    assert report["runs"] == 1 and report["pulled"] == [ids[0]]
    assert_registry_clean(b, [ids[0]])
    # without --json: one line on stderr, nothing on stdout (this pull lands ids[1], fails on ids[2])
    proc = cli("archive", "pull", archive["url"], *ids, env=env)
    assert proc.returncode == 6 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert "no space left" in proc.stderr and "1 runs were pulled whole" in proc.stderr
    assert_registry_clean(b, ids[:2])
    # the disk has room again: the pull completes
    proc, out = cli_json("archive", "pull", archive["url"], *ids, env=home(b))
    assert proc.returncode == 0 and out[0]["pulled"] == ids[2:] and out[0]["runs_present"] == 2
    assert_registry_clean(b, ids)


def test_pull_whose_batch_sync_hits_a_full_disk_leaves_no_temp(tmp_path, monkeypatch):
    """The disk fills while a run's batch is made durable (its last step before the manifest):
    the batch's temps are removed, not left in blobs/tmp (store.Batch.__exit__ would leave them
    if the sync ran there)."""
    import errno

    from casruns.errors import NoSpace
    from casruns.store import DiskStore

    a = Registry(tmp_path / "A")
    ids = three_runs(a)
    a.archive_push(str(tmp_path / "archive"), ids)
    b = Registry(tmp_path / "B")
    real, calls = DiskStore._commit_batch, []

    def commit(self, temps, packs_):
        calls.append(len(temps) + len(packs_))
        if len(calls) == 4:  # run 1: tree, then the rest; run 2: tree, then this one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, temps, packs_)

    monkeypatch.setattr(DiskStore, "_commit_batch", commit)
    with pytest.raises(NoSpace) as caught:
        b.archive_pull(str(tmp_path / "archive"), ids)
    assert calls[3] > 0 and caught.value.details["report"]["pulled"] == ids[:1]
    monkeypatch.undo()
    assert_registry_clean(Registry(tmp_path / "B"), ids[:1])


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (a real full disk); unmounted afterwards."""
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", 4) as d:
        yield d


def test_pull_onto_a_real_full_tmpfs(tmp_path, small_fs, validate):
    a = Registry(tmp_path / "A")
    # ~1.3 MB of incompressible data a run: the 4 MiB registry fills on the third or fourth
    ids = [finished_run(a, files={"r.bin": os.urandom(1300 << 10), "s.bin": os.urandom(3000)}) for _ in range(5)]
    a.archive_push(str(tmp_path / "archive"), ids)
    b = Registry(small_fs / "reg")
    proc, out = cli_json("archive", "pull", str(tmp_path / "archive"), *ids, env=home(b))
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    err = validate(out[0], "error.schema.json")["error"]
    assert err["code"] == "no_space", err
    report = validate(err["details"]["report"], "reports.schema.json#/$defs/archive_pull")
    assert 1 <= report["runs"] < len(ids) and report["pulled"] == ids[: report["runs"]]
    assert_registry_clean(b, report["pulled"])


def test_push_to_a_full_directory_archive_reports_no_space_and_leaves_no_partial_object(tmp_path, validate):
    reg = Registry(tmp_path / "A")
    ids = three_runs(reg, size=200000)
    dest = tmp_path / "archive"
    reg.archive_push(str(dest), ids[:1])
    env = {**home(reg), "CASRUNS_TEST_FAULT": "archive_push_mid_object=enospc"}
    proc, out = cli_json("archive", "push", str(dest), *ids, env=env)
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    err = validate(out[0], "error.schema.json")["error"]
    assert err["code"] == "no_space" and str(dest) in err["message"]
    report = validate(err["details"]["report"], "reports.schema.json#/$defs/archive_push")
    assert report["runs"] == 1 and ids[1] in err["message"]  # the first run was there whole: nothing written
    assert_no_partial_objects(dest)
    assert sorted(os.listdir(dest / "runs")) == [ids[0]]
    # the disk has room again: the push completes, the archive verifies
    assert reg.archive_push(str(dest), ids)["runs"] == 3
    assert archmod.compare(reg, str(dest), ids, read_data=True) == []


def test_push_to_a_real_full_tmpfs_archive(tmp_path, small_fs, validate):
    reg = Registry(tmp_path / "A")
    ids = [finished_run(reg, files={"r.bin": os.urandom(1300 << 10), "s.bin": os.urandom(3000)}) for _ in range(5)]
    dest = small_fs / "archive"
    proc, out = cli_json("archive", "push", str(dest), *ids, "--jobs", "2", env=home(reg))
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    err = validate(out[0], "error.schema.json")["error"]
    assert err["code"] == "no_space", err
    report = validate(err["details"]["report"], "reports.schema.json#/$defs/archive_push")
    assert 1 <= report["runs"] < len(ids)
    assert_no_partial_objects(dest)
    pushed = sorted(os.listdir(dest / "runs"))
    assert len(pushed) == report["runs"]
    assert archmod.compare(reg, str(dest), pushed, read_data=True) == []


# -- FIFOs and symlinks in an archive --------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["", "local://"])
@pytest.mark.parametrize("where", ["blob", "manifest", "marker"])
def test_a_fifo_in_a_directory_archive_never_hangs_a_reader(tmp_path, scheme, where):
    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"n.txt": b"numbers\n" * 100})
    root = tmp_path / "archive"
    reg.archive_push(str(root), [rid])
    target = reg.tree(rid).get("n.txt").blake3
    path = {"blob": root / key_of(target), "manifest": root / "runs" / rid / "manifest.toml", "marker": root / "casruns-archive.toml"}[where]
    path.unlink()
    os.mkfifo(path)
    url = scheme + str(root)
    proc, out = cli_json("archive", "pull", url, rid, env={"CASRUNS_HOME": str(tmp_path / "B")}, timeout=30)
    assert proc.returncode == 6 and out[0]["error"]["code"] in ("stray_file", "unsupported_format"), out
    proc, out = cli_json("verify", "--against", url, rid, env=home(reg), timeout=30)
    if where == "manifest":
        assert proc.returncode == 14 and [p["kind"] for p in out[0]["problems"]] == ["archive_corrupt"]
    elif where == "marker":
        assert proc.returncode == 6, out
    if where == "blob":  # a FIFO is no object: missing, and any push writes the blob in its place
        problems = archmod.compare(reg, url, [rid], read_data=True)
        assert [(p["kind"], p.get("address")) for p in problems] == [("archive_missing" if not scheme else "archive_differs", target)]
        pushed = reg.archive_push(url, [rid])
        assert pushed["blobs_sent"] == 1
        assert archmod.compare(reg, url, [rid], read_data=True) == []


def test_a_symlinked_blob_in_a_directory_archive_is_not_followed(tmp_path):
    reg = Registry(tmp_path / "A")
    rid = finished_run(reg, files={"n.txt": b"numbers\n" * 100})
    root = tmp_path / "archive"
    reg.archive_push(str(root), [rid])
    target = reg.tree(rid).get("n.txt").blake3
    p = root / key_of(target)
    elsewhere = tmp_path / "elsewhere"
    os.rename(p, elsewhere)
    os.symlink(elsewhere, p)
    proc, out = cli_json("archive", "pull", str(root), env={"CASRUNS_HOME": str(tmp_path / "B")}, timeout=30)
    assert proc.returncode == 6 and out[0]["error"]["code"] == "stray_file", out
    assert out[0]["error"]["details"]["report"]["runs"] == 0
    # a symlink is no object of the archive (its size is never taken through the link):
    # missing, and a plain push writes the blob in its place, never through the link
    problems = archmod.compare(reg, str(root), [rid], read_data=True)
    assert [(p["kind"], p.get("address")) for p in problems] == [("archive_missing", target)]
    report = reg.archive_push(str(root), [rid])
    assert report["blobs_sent"] == 1 and not p.is_symlink() and elsewhere.exists()
    assert archmod.compare(reg, str(root), [rid], read_data=True) == []
