"""Archives: push and pull through a local directory and a real S3-compatible server (moto,
started here on loopback, driven through s3fs as a user's casruns would)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from casruns import Registry
from conftest import cli, cli_json

pytest.importorskip("s3fs")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["dir", "s3"])
def archive(request, tmp_path, monkeypatch):
    """(url, env for CLI calls, a function to reach an object's bytes for tampering)."""
    if request.param == "dir":
        root = tmp_path / "archive"
        return {"url": str(root), "env": {}, "path": lambda key: root / key}
    endpoint = request.getfixturevalue("s3_server")
    for k, v in {**KEYS, "CASRUNS_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    bucket = f"evidence-{os.urandom(4).hex()}"
    fs.mkdir(bucket)
    return {"url": f"s3://{bucket}/fleet", "env": {}, "fs": fs, "key": lambda key: f"{bucket}/fleet/{key}"}


def make_run(home: Path, *script_args, promote=True) -> str:
    env = {"CASRUNS_HOME": str(home)}
    proc, out = cli_json("submit", "--", "sh", "-c", *script_args, env=env)
    rid = out[0]["run_id"]
    assert cli("wait", rid, "--timeout", "30", env=env).returncode in (0, 10)
    if promote:
        cli("promote", rid, "--reason", "accepted", env=env, check=0)
    return rid


def evidence(reg: Registry, rid: str) -> dict:
    out = {s: b"".join(reg.log_chunks(rid, s)) for s in ("stdout", "stderr", "transcript")}
    for e in reg.tree(rid).entries:
        out[e.path] = b"".join(reg.cat(rid, e.path))
    return out


def read_obj(archive, key) -> bytes:
    if "fs" in archive:
        return archive["fs"].cat_file(archive["key"](key))
    return archive["path"](key).read_bytes()


def write_obj(archive, key, data: bytes) -> None:
    if "fs" in archive:
        archive["fs"].pipe_file(archive["key"](key), data)
    else:
        p = archive["path"](key)
        os.chmod(p, 0o600)
        p.write_bytes(data)


def test_round_trip_keeps_ids_status_promotion_and_bytes(tmp_path, archive, validate):
    a, b = tmp_path / "A", tmp_path / "B"
    rid = make_run(a, 'echo evidence; mkdir -p "$CASRUNS_ARTIFACTS_DIR/r"; head -c 300000 /dev/urandom > "$CASRUNS_ARTIFACTS_DIR/r/blob.bin"; echo "<ok/>" > "$CASRUNS_ARTIFACTS_DIR/r/junit.xml"')
    other = make_run(a, "echo not promoted", promote=False)
    proc, out = cli_json("archive", "push", archive["url"], "--promoted", env={"CASRUNS_HOME": str(a)})
    assert proc.returncode == 0, out
    report = validate(out[0], "reports.schema.json#/$defs/archive_push")
    assert report["runs"] == 1 and report["blobs_sent"] == 6 and report["bytes_sent"] == report["bytes_logical"]
    proc, out = cli_json("archive", "list", archive["url"], env={"CASRUNS_HOME": str(a)})
    listing = validate(out[0], "reports.schema.json#/$defs/archive_list")
    assert [(r["run_id"], r["status"], r["promoted"]) for r in listing["runs"]] == [(rid, "succeeded", True)]
    proc, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(b)})
    assert proc.returncode == 0 and validate(out[0], "reports.schema.json#/$defs/archive_pull")["runs"] == 1
    ra, rb = Registry(a), Registry(b)
    assert evidence(rb, rid) == evidence(ra, rid)
    ga, gb = ra.get(rid), rb.get(rid)
    assert (gb["run_id"], gb["status"], gb["retention"]["promoted"], gb["created_at"]) == (ga["run_id"], ga["status"], True, ga["created_at"])
    assert not rb.run_dir(other).exists()
    assert rb.verify(read_data=True)["ok"]
    proc, out = cli_json("verify", "--against", archive["url"], rid, env={"CASRUNS_HOME": str(a)})
    assert proc.returncode == 0 and out[0]["ok"]
    proc, out = cli_json("verify", "--against", archive["url"], other, env={"CASRUNS_HOME": str(a)})
    assert proc.returncode == 14 and out[0]["problems"][0]["kind"] == "archive_missing"
    # pulling again changes nothing
    proc, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(b)})
    assert out[0]["runs"] == 0 and out[0]["runs_present"] == 1


def test_two_registries_share_blobs_in_one_archive(tmp_path, archive):
    a, b = tmp_path / "A", tmp_path / "B"
    common = 'head -c 200000 /dev/zero | tr "\\0" "w" > "$CASRUNS_ARTIFACTS_DIR/wordpress.sql"'
    ra = make_run(a, f"{common}; echo from A")
    rb = make_run(b, f"{common}; echo from B")
    _, out = cli_json("archive", "push", archive["url"], ra, env={"CASRUNS_HOME": str(a)})
    assert out[0]["blobs_skipped"] == 0
    _, out = cli_json("archive", "push", archive["url"], rb, env={"CASRUNS_HOME": str(b)})
    rep = out[0]
    assert rep["blobs_skipped"] >= 2  # the shared dump and the empty stderr are already there
    assert rep["bytes_sent"] < rep["bytes_logical"]
    c = tmp_path / "C"
    _, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(c)})
    assert out[0]["runs"] == 2 and out[0]["blobs_present"] >= 1  # shared blobs are fetched once
    rc = Registry(c)
    assert evidence(rc, ra)["wordpress.sql"] == evidence(rc, rb)["wordpress.sql"] == b"w" * 200000


def test_interrupted_push_resumes_without_resending(tmp_path, archive):
    a = tmp_path / "A"
    ids = [make_run(a, f'echo run {i}; echo "artifact {i}" > "$CASRUNS_ARTIFACTS_DIR/a{i}.txt"') for i in range(3)]
    proc = cli("archive", "push", archive["url"], "--promoted", env={"CASRUNS_HOME": str(a), "CASRUNS_TEST_FAULT": "archive_push_blob=kill@7"})
    assert proc.returncode == -9
    # the archive may hold some runs whole; never a manifest whose blobs are missing
    b = tmp_path / "B"
    _, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(b)})
    assert out[0]["runs"] < 3
    assert Registry(b).verify(read_data=True)["ok"]
    _, out = cli_json("archive", "push", archive["url"], "--promoted", env={"CASRUNS_HOME": str(a)})
    assert out[0]["runs"] == 3 and out[0]["blobs_skipped"] >= 7
    _, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(b)})
    assert {r["run_id"] for r in Registry(b).list()} == set(ids)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_blob_is_rejected_on_pull(tmp_path, archive, damage):
    a, b = tmp_path / "A", tmp_path / "B"
    rid = make_run(a, 'echo hello; seq 1 20000 > "$CASRUNS_ARTIFACTS_DIR/numbers.txt"')
    cli("archive", "push", archive["url"], rid, env={"CASRUNS_HOME": str(a)}, check=0)
    target = Registry(a).tree(rid).get("numbers.txt").blake3
    key = f"blobs/{target[:2]}/{target[2:]}"
    raw = bytearray(read_obj(archive, key))
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        raw = raw[: len(raw) // 2]
    write_obj(archive, key, bytes(raw))
    proc, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(b)})
    assert proc.returncode == 7 and out[0]["error"]["code"] == "integrity_error"
    assert target in out[0]["error"]["message"]
    rb = Registry(b)
    assert not rb.store.contains(target)
    assert rb.list() == []
    assert list(rb.store.iter_temp_files()) == []


def test_missing_backend_names_the_extra(registry):
    proc, out = cli_json("archive", "list", "sftp://archive.example/evidence")
    assert proc.returncode == 3 and out[0]["error"]["code"] == "backend_missing"
    assert "casruns[sftp]" in out[0]["error"]["message"]


def test_push_refuses_active_runs(registry):
    rid = registry.submit(["true"], spawn=False)["run_id"]
    proc, out = cli_json("archive", "push", str(Path(registry.root).parent / "arch"), rid)
    assert proc.returncode == 3 and "finished" in out[0]["error"]["message"]


def test_pull_restores_a_quarantined_blob(tmp_path, archive):
    a = tmp_path / "A"
    rid = make_run(a, 'seq 1 5000 > "$CASRUNS_ARTIFACTS_DIR/n.txt"')
    cli("archive", "push", archive["url"], rid, env={"CASRUNS_HOME": str(a)}, check=0)
    reg = Registry(a)
    target = reg.tree(rid).get("n.txt").blake3
    p = reg.store.path_for(target)
    raw = bytearray(p.read_bytes())
    raw[-4] ^= 0x55
    p.write_bytes(bytes(raw))
    proc, out = cli_json("verify", "--read-data", "--quarantine", env={"CASRUNS_HOME": str(a)})
    assert proc.returncode == 14 and out[0]["quarantined"] == [target]
    proc, out = cli_json("archive", "pull", archive["url"], env={"CASRUNS_HOME": str(a)})
    assert proc.returncode == 0 and out[0]["blobs_repaired"] == 1
    assert cli("verify", "--read-data", env={"CASRUNS_HOME": str(a)}).returncode == 0
    assert b"".join(reg.cat(rid, "n.txt")) == "".join(f"{i}\n" for i in range(1, 5001)).encode()


def test_readers_refuse_a_directory_that_is_not_an_archive(registry, tmp_path):
    (tmp_path / "junk" / "runs").mkdir(parents=True)
    proc, out = cli_json("archive", "list", str(tmp_path / "junk"))
    assert proc.returncode == 6 and out[0]["error"]["code"] == "unsupported_format"


def test_push_sends_blobs_concurrently_and_each_manifest_after_its_blobs(tmp_path, monkeypatch):
    """Uploads overlap (an object store is latency-bound), yet no manifest is written before
    every blob of its run is in the archive."""
    import threading
    import time

    from casruns import archive as archmod
    from test_gc import finished_run

    reg = Registry(tmp_path / "reg")
    runs = [finished_run(reg, files={f"f{i}.txt": f"run {k} file {i}\n".encode() * 20 for i in range(12)}) for k in range(3)]
    events, lock, flight = [], threading.Lock(), {"now": 0, "max": 0}
    real_bytes, real_file = archmod.LocalRemote.put_bytes, archmod.LocalRemote.put_file

    def traced(real):
        def put(self, *args):
            key = args[-1] if real is real_bytes else args[1]
            with lock:
                flight["now"] += 1
                flight["max"] = max(flight["max"], flight["now"])
            time.sleep(0.01)  # a request's latency
            try:
                return real(self, *args)
            finally:
                with lock:
                    flight["now"] -= 1
                    events.append(key)
        return put

    monkeypatch.setattr(archmod.LocalRemote, "put_bytes", traced(real_bytes))
    monkeypatch.setattr(archmod.LocalRemote, "put_file", traced(real_file))
    report = reg.archive_push(str(tmp_path / "archive"), runs, jobs=4)
    assert report["runs"] == 3 and flight["max"] > 1
    for rid in runs:
        done = events.index(f"runs/{rid}/manifest.toml")
        m = reg.run_dir(rid).read()
        wanted = {f"blobs/{a[:2]}/{a[2:]}" for a in archmod._run_blobs(reg, m)}
        assert wanted <= set(events[:done])  # sent before (by this or an earlier run), never after
    other = Registry(tmp_path / "other")
    other.archive_pull(str(tmp_path / "archive"), runs)
    assert other.verify(read_data=True)["ok"]
    proc, out = cli_json("archive", "push", str(tmp_path / "archive"), runs[0], "--jobs", "0", env={"CASRUNS_HOME": str(tmp_path / "reg")})
    assert proc.returncode == 3 and out[0]["error"]["code"] == "invalid_input"


def test_pull_fetches_small_frames_ahead_concurrently_and_streams_large_ones(tmp_path, monkeypatch):
    import threading
    import time

    from casruns import archive as archmod
    from test_gc import finished_run

    reg = Registry(tmp_path / "reg")
    big = os.urandom(3 << 20)  # its frame is over SMALL_FRAME: streamed, never held whole
    files = {f"f{i}.txt": f"file {i}\n".encode() * 50 for i in range(20)}
    rid = finished_run(reg, files={**files, "big.bin": big})
    reg.archive_push(str(tmp_path / "archive"), [rid])
    lock, flight = threading.Lock(), {"now": 0, "max": 0}
    real_open = archmod.LocalRemote.open

    def slow_open(self, key):
        with lock:
            flight["now"] += 1
            flight["max"] = max(flight["max"], flight["now"])
        time.sleep(0.01)
        with lock:
            flight["now"] -= 1
        return real_open(self, key)

    monkeypatch.setattr(archmod.LocalRemote, "open", slow_open)
    other = Registry(tmp_path / "other")
    report = other.archive_pull(str(tmp_path / "archive"), [rid], jobs=4)
    assert report["runs"] == 1 and flight["max"] > 1
    assert b"".join(other.cat(rid, "big.bin")) == big
    assert b"".join(other.cat(rid, "f7.txt")) == files["f7.txt"]
    assert other.verify(read_data=True)["ok"]
    with pytest.raises(Exception, match="at least 1"):
        Registry(tmp_path / "third").archive_pull(str(tmp_path / "archive"), [rid], jobs=0)
