"""Strays (spec/format.md, "Strays"): FIFOs, directories, symlinks and files where the registry
expects something else. None of them may hang, crash or fool a command: readers skip them, writers
never take one for a blob, and verify reports each one and goes on.

Anything that could hang runs in a subprocess with a timeout (the real CLI, or a detached
supervisor waited for with ``casruns wait --timeout``), so a regression fails instead of hanging
the suite; supervisors a test started and that are still alive at its end are killed by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from casruns import Registry, locking
from casruns import pins as pinsmod
from casruns.errors import BlobNotFound, StrayFile
from casruns.store import DiskStore
from conftest import cli, cli_json
from test_gc import finished_run

TIMEOUT = 30  # seconds any command here may take before the test counts it as hung


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def many_files(tag: str, n: int = 30) -> dict:
    return {f"out/{tag}-{i}.txt": f"{tag} artifact {i}\n".encode() * 10 for i in range(n)}


def run_cli(*args, env=None):
    """The real CLI (JSON output) with a timeout: a hang fails the test."""
    try:
        return cli_json(*args, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"casruns {' '.join(map(str, args))} hung for {TIMEOUT}s")


def fake_pack_name(seed: str = "stray") -> str:
    return b3(seed.encode()) + ".pack"


@pytest.fixture(autouse=True)
def no_hang():
    """In-process code that blocks (opening a FIFO waits for a writer) is interrupted by an alarm:
    the handler's exception aborts the blocked system call, so the test fails instead of hanging."""

    def hung(signum, frame):
        raise TimeoutError(f"the test hung for {3 * TIMEOUT}s (a stray was opened and blocked)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(3 * TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def supervisors(casruns_home):
    """Kill, at the end of the test, any supervisor of this registry that is still alive (a run
    stuck by a regression must not outlive its test)."""
    yield
    runs = Path(casruns_home) / "runs"
    for d in runs.iterdir() if runs.is_dir() else []:
        lock = d / "supervisor.lock"
        if d.is_symlink() or not d.is_dir() or lock.is_symlink() or not lock.is_file():
            continue
        if locking.is_held(lock):
            rec = locking.read_record(lock) or {}
            if isinstance(rec.get("pid"), int):
                try:
                    os.kill(rec["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def submit_many_artifacts(env: dict, n: int = 15) -> str:
    """A real run through the CLI and a detached supervisor: ``n`` small artifacts (a pack)."""
    script = f'for i in $(seq 1 {n}); do echo "case $i ok" > "$CASRUNS_ARTIFACTS_DIR/case$i.txt"; done; echo done'
    proc, out = run_cli("submit", "--", "sh", "-c", script, env=env)
    assert proc.returncode == 0, proc.stderr
    rid = out[0]["run_id"]
    try:
        waited = cli("wait", rid, "--timeout", str(TIMEOUT), env=env, timeout=TIMEOUT + 15)
    except subprocess.TimeoutExpired:
        pytest.fail("casruns wait hung")
    assert waited.returncode == 0, f"run {rid} did not succeed in time: exit {waited.returncode} {waited.stdout} {waited.stderr}"
    return rid


def strays_of(report: dict) -> dict[str, str]:
    return {s["path"]: s["kind"] for s in report["strays"]}


# -- blobs/packs/ ------------------------------------------------------------------------------


def test_a_fifo_named_like_a_pack_blocks_no_read_no_verify_and_no_new_run(registry, validate, supervisors):
    rid = finished_run(registry, files=many_files("f"))
    packs_dir = Path(registry.store.packs_dir)
    assert len(list(packs_dir.glob("*.pack"))) == 1
    fifo = packs_dir / fake_pack_name()
    os.mkfifo(fifo)
    env = {"CASRUNS_HOME": registry.root}

    proc = cli("cat", rid, "out/f-7.txt", env=env, timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stdout == "f artifact 7\n" * 10, proc.stderr

    proc, out = run_cli("verify", "--read-data", env=env)
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14 and not out[0]["ok"] and out[0]["problems"] == [], out
    assert strays_of(out[0]) == {f"blobs/packs/{fifo.name}": "fifo"}

    new = submit_many_artifacts(env)  # the supervisor's collection lists packs/ too
    assert b"".join(Registry(registry.root).cat(new, "case9.txt")) == b"case 9 ok\n"
    assert fifo.exists() and not fifo.is_file()  # skipped, never removed


def test_a_directory_named_like_a_pack_does_not_stop_new_runs(registry, validate, supervisors):
    env = {"CASRUNS_HOME": registry.root}
    packs_dir = Path(registry.store.packs_dir)
    packs_dir.mkdir(parents=True, exist_ok=True)
    (packs_dir / fake_pack_name("dir")).mkdir()
    rid = submit_many_artifacts(env)
    reg = Registry(registry.root)
    assert reg.get(rid)["status"] == "succeeded"
    assert b"".join(reg.cat(rid, "case3.txt")) == b"case 3 ok\n"
    assert len(reg.store.pack_names()) == 1 and reg.store.bad_packs == {}
    proc, out = run_cli("verify", "--read-data", env=env)
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14 and out[0]["problems"] == []
    assert strays_of(out[0]) == {f"blobs/packs/{fake_pack_name('dir')}": "directory"}


def test_a_symlink_named_like_a_pack_is_never_followed(registry, tmp_path):
    finished_run(registry, files=many_files("s"))
    store = registry.store
    [real] = store.pack_names()
    outside = tmp_path / "outside.pack"
    outside.write_bytes((Path(store.packs_dir) / real).read_bytes())  # a valid pack, elsewhere
    link = Path(store.packs_dir) / fake_pack_name("link")
    link.symlink_to(outside)
    fresh = DiskStore(store.path)
    assert fresh.pack_names() == [real] and fresh.bad_packs == {}
    assert {p: k for p, k in fresh.iter_strays()} == {f"packs/{link.name}": "symlink"}


# -- loose blobs ---------------------------------------------------------------------------------


def loose_artifact(registry) -> tuple[str, str, Path]:
    """A finished run with one small artifact stored loose: (run id, address, its file)."""
    data = b"one loose artifact\n"
    rid = finished_run(registry, files={"a.txt": data})
    address = b3(data)
    path = registry.store.path_for(address)
    assert path.is_file() and not registry.store.pack_names()
    return rid, address, path


def test_a_fifo_as_a_loose_blob_reads_as_missing_and_verify_reports_it(registry, validate):
    rid, address, path = loose_artifact(registry)
    path.unlink()
    os.mkfifo(path)
    env = {"CASRUNS_HOME": registry.root}
    proc, out = run_cli("cat", rid, "a.txt", env=env)
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    err = out[0]
    validate(err, "error.schema.json")
    assert err["error"]["code"] == "blob_not_found" and "FIFO" in err["error"]["message"], err
    assert "Traceback" not in proc.stderr

    proc, out = run_cli("verify", "--read-data", env=env)
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14
    assert [(p["kind"], p.get("address")) for p in out[0]["problems"]] == [("blob_missing", address)]
    assert strays_of(out[0]) == {f"blobs/{address[:2]}/{address[2:]}": "fifo"}
    proc, out = run_cli("verify", rid, env=env)  # a verify of the run names the stray as well
    assert proc.returncode == 14 and strays_of(out[0]) == {f"blobs/{address[:2]}/{address[2:]}": "fifo"}


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_stray_at_a_blobs_address_is_not_a_stored_blob(tmp_path, kind):
    store = DiskStore(tmp_path / "blobs")
    data = b"the real content\n"
    address = b3(data)
    path = store.path_for(address)
    path.parent.mkdir(parents=True)
    other = DiskStore(tmp_path / "other")
    elsewhere = other.path_for(other.put_bytes(data).address)  # a good blob file, outside this store
    {"fifo": lambda: os.mkfifo(path), "symlink": lambda: path.symlink_to(elsewhere), "directory": path.mkdir}[kind]()

    assert not store.contains(address)
    assert list(store.iter_loose_addresses()) == [] and list(store.iter_addresses()) == []
    assert dict(store.iter_strays()) == {f"{address[:2]}/{address[2:]}": kind}
    with pytest.raises(BlobNotFound, match="stray"):
        store.read_bytes(address)
    with pytest.raises(BlobNotFound):
        store.stat(address)
    with pytest.raises(BlobNotFound):
        store.frame_source(address)
    assert not store.delete(address)
    # a put is never fooled into "already present": it replaces a FIFO or a symlink with the
    # blob (rename), and refuses clearly to store over a directory
    if kind == "directory":
        with pytest.raises(StrayFile, match="directory"):
            store.put_bytes(data)
        with pytest.raises(StrayFile, match="directory"):
            with store.batch(store.pin()) as batch:
                batch.put_bytes(data)
        assert path.is_dir() and not store.contains(address)
        return
    info = store.put_bytes(data)
    assert not info.existed and path.is_file() and not path.is_symlink()
    assert store.read_bytes(address) == data and dict(store.iter_strays()) == {}
    assert elsewhere.exists()  # the symlink's target was not touched


def test_a_batch_replaces_a_stray_fifo_at_its_address(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    data = b"batched content\n"
    address = b3(data)
    path = store.path_for(address)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with store.batch(store.pin()) as batch:
        assert not batch.put_bytes(data).existed
    assert path.is_file() and store.read_bytes(address) == data


def test_a_symlinked_shard_directory_is_never_followed(tmp_path):
    store = DiskStore(tmp_path / "blobs")
    other = DiskStore(tmp_path / "other")
    data = b"content behind a symlinked shard\n"
    address = other.put_bytes(data).address
    store.path.mkdir()
    (store.path / address[:2]).symlink_to(other.path / address[:2])
    assert not store.contains(address)
    assert list(store.iter_loose_addresses()) == []
    with pytest.raises(BlobNotFound):
        store.read_bytes(address)
    assert dict(store.iter_strays()) == {address[:2]: "symlink"}
    with pytest.raises(StrayFile, match="symlink"):
        store.put_bytes(data)
    with pytest.raises(StrayFile, match="symlink"):
        with store.batch(store.pin()) as batch:
            batch.put_bytes(data)
    assert list(other.iter_loose_addresses()) == [address]  # nothing was written through the link


def test_gc_skips_strays_in_the_store_and_deletes_none(registry):
    """gc lists loose blobs, packs and temps through the store: strays are never candidates."""
    from test_gc import evidence, make_old

    rid = finished_run(registry, files={**many_files("k"), "big.bin": os.urandom(2 << 20)})
    before = evidence(registry, rid)
    store = registry.store
    orphan = b3(b"no blob here")
    strays = {
        f"packs/{fake_pack_name('gc-fifo')}": "fifo",
        f"packs/{fake_pack_name('gc-dir')}": "directory",
        f"{orphan[:2]}/{orphan[2:]}": "fifo",
        "tmp/1-0123456789abcdef.tmp": "directory",
    }
    old = 1_000_000_000
    for rel, kind in strays.items():
        path = store.path / rel
        path.parent.mkdir(exist_ok=True)
        path.mkdir() if kind == "directory" else os.mkfifo(path)
        os.utime(path, (old, old), follow_symlinks=False)
    make_old(registry)
    proc = subprocess.run([sys.executable, "-m", "casruns", "--root", registry.root, "gc", "--json"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert all(os.path.lexists(store.path / rel) for rel in strays)  # a stray is the operator's to remove
    assert dict(DiskStore(store.path).iter_strays()) == strays
    assert evidence(Registry(registry.root), rid) == before


@pytest.mark.parametrize("name", ["tmp", "pins", "packs"])
def test_a_symlinked_store_directory_is_never_written_through(tmp_path, name):
    store = DiskStore(tmp_path / "blobs")
    store.path.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (store.path / name).symlink_to(elsewhere)
    datas = [f"blob {i}\n".encode() * 20 for i in range(20)]  # enough to make a pack
    with pytest.raises(StrayFile, match="symlink"):
        with store.batch(store.pin()) as batch:
            for d in datas:
                batch.put_bytes(d)
    assert list(elsewhere.iterdir()) == []  # no temp, pin or pack went through the link
    assert dict(store.iter_strays()) == {name: "symlink"}
    assert store.pack_names() == [] and not store.contains(b3(datas[0]))


# -- pins ----------------------------------------------------------------------------------------


def plant_stray_pins(store: DiskStore, tmp_path: Path) -> dict[str, str]:
    pins = Path(store.pins_dir)
    pins.mkdir(parents=True, exist_ok=True)
    os.mkfifo(pins / "111-aaaaaaaaaaaaaaaa.pin")
    target = tmp_path / "target.pin"
    target.write_text(b3(b"not a pin") + "\n")
    (pins / "222-bbbbbbbbbbbbbbbb.pin").symlink_to(target)
    (pins / "333-cccccccccccccccc.done").mkdir()
    os.mkfifo(pins / "444-dddddddddddddddd.pin.new")
    old = 1_000_000_000  # old enough for gc's look at pins whose creator died
    os.utime(pins / "444-dddddddddddddddd.pin.new", (old, old))
    return {
        "pins/111-aaaaaaaaaaaaaaaa.pin": "fifo",
        "pins/222-bbbbbbbbbbbbbbbb.pin": "symlink",
        "pins/333-cccccccccccccccc.done": "directory",
        "pins/444-dddddddddddddddd.pin.new": "fifo",
    }


def test_stray_pins_are_no_pins_and_verify_reports_them(registry, validate, tmp_path, supervisors):
    store = registry.store
    expected = plant_stray_pins(store, tmp_path)
    with store.pin() as live:
        live.add(b3(b"pinned"))
        assert store.pin_files() == [live.path]  # strays are not listed as pins
        assert not pinsmod.pin_settled(live.path)
        assert pinsmod.read_pin(live.path) == {b3(b"pinned")}
    for rel in expected:  # never opened for reading (a FIFO would block), never held
        path = str(store.path / rel)
        assert pinsmod.read_pin(path) == set()
        assert pinsmod.pin_settled(path)
    env = {"CASRUNS_HOME": registry.root}
    rid = submit_many_artifacts(env)  # a real ingest pins beside them
    proc, out = run_cli("verify", env=env)
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14 and out[0]["problems"] == [] and out[0]["runs_checked"] == 1
    assert strays_of(out[0]) == {f"blobs/{k}": v for k, v in expected.items()}
    assert Registry(registry.root).get(rid)["status"] == "succeeded"


def test_gc_is_not_blocked_by_a_stray_pin(registry, tmp_path):
    """gc judges pins by their flock (locking.is_held opens with O_NONBLOCK|O_NOFOLLOW): a FIFO
    named like a pin blocked gc forever, holding locks/gc.lock."""
    rid = finished_run(registry, files=many_files("g"))
    plant_stray_pins(registry.store, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "casruns", "--root", registry.root, "gc"], capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert Registry(registry.root).get(rid)["status"] == "succeeded"


def test_gc_leaves_stray_pins_alone(registry, tmp_path):
    finished_run(registry, files=many_files("g"))
    expected = plant_stray_pins(registry.store, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "casruns", "--root", registry.root, "gc"], capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert dict(DiskStore(registry.store.path).iter_strays()) == expected  # the operator's to remove


# -- runs/ -----------------------------------------------------------------------------------------


STRAY_RUNS = {
    # name: (make it, expected stray path relative to the registry, expected kind)
    "file": (lambda runs, real: (runs / "01STRAYFILE").write_text("x"), "runs/01STRAYFILE", "file"),
    "fifo": (lambda runs, real: os.mkfifo(runs / "01STRAYFIFO"), "runs/01STRAYFIFO", "fifo"),
    "empty_dir": (lambda runs, real: (runs / "01STRAYDIR").mkdir(), "runs/01STRAYDIR", "directory"),
    "symlink": (lambda runs, real: (runs / "01STRAYLINK").symlink_to(real), "runs/01STRAYLINK", "symlink"),
    "manifest_dir": (lambda runs, real: (runs / "01MDIR" / "manifest.toml").mkdir(parents=True), "runs/01MDIR/manifest.toml", "directory"),
    "manifest_fifo": (lambda runs, real: ((runs / "01MFIFO").mkdir(), os.mkfifo(runs / "01MFIFO" / "manifest.toml")), "runs/01MFIFO/manifest.toml", "fifo"),
    "manifest_symlink": (
        lambda runs, real: ((runs / "01MLINK").mkdir(), (runs / "01MLINK" / "manifest.toml").symlink_to(real / "manifest.toml")),
        "runs/01MLINK/manifest.toml",
        "symlink",
    ),
}


@pytest.mark.parametrize("case", sorted(STRAY_RUNS))
def test_verify_reports_a_stray_in_runs_and_goes_on(registry, validate, case):
    rid = finished_run(registry)
    runs = Path(registry.runs_dir)
    make, rel, kind = STRAY_RUNS[case]
    make(runs, runs / rid)
    env = {"CASRUNS_HOME": registry.root}
    proc, out = run_cli("verify", "--read-data", env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 14, (proc.returncode, proc.stderr)
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert out[0]["problems"] == [] and out[0]["runs_checked"] == 1  # the real run was checked
    assert strays_of(out[0]) == {rel: kind}
    stray_id = rel.split("/")[1]
    assert [s.get("run_id") for s in out[0]["strays"]] == [stray_id]
    proc, out = run_cli("verify", stray_id, env=env)  # named: the same stray, no traceback
    assert proc.returncode == 14 and "Traceback" not in proc.stderr, proc.stderr
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert strays_of(out[0]) == {rel: kind} and out[0]["runs_checked"] == 0


def test_a_run_whose_regular_manifest_does_not_parse_is_damaged_not_a_stray(registry, validate):
    rid = finished_run(registry)
    bad = Path(registry.runs_dir) / "01DAMAGED"
    bad.mkdir()
    (bad / "manifest.toml").write_text("this is [not toml\n")
    proc, out = run_cli("verify", env={"CASRUNS_HOME": registry.root})
    validate(out[0], "reports.schema.json#/$defs/verify")
    assert proc.returncode == 14 and out[0]["strays"] == []
    assert [(p["kind"], p["run_id"]) for p in out[0]["problems"]] == [("manifest_invalid", "01DAMAGED")]
    assert out[0]["runs_checked"] == 2 and rid


def test_a_stray_that_stops_collection_still_ends_the_run_and_never_stops_reap(casruns_home):
    """Hostile review: a directory where one of the run's blobs belongs made collection fail;
    the run stayed collecting_artifacts with no supervisor and reap aborted on it."""
    import blake3
    import json as _json
    from conftest import cli, poll_until

    cli("init", check=0)
    addr = blake3.blake3(b"strayblob\n").hexdigest()
    (casruns_home / "blobs" / addr[:2] / addr[2:]).mkdir(parents=True)
    rid = _json.loads(cli("submit", "--json", "--", "sh", "-c", "echo strayblob", check=0).stdout)["run_id"]
    final = poll_until(lambda: (r := _json.loads(cli("status", rid, "--json").stdout))["terminal"] and r, what="terminal")
    assert final["status"] == "failed" and final["error"]["code"] == "collect_failed", final
    assert cli("logs", rid, check=0).stdout == "strayblob\n"  # kept in the workspace, readable
    proc = cli("reap", "--json")
    assert proc.returncode == 0 and rid in _json.loads(proc.stdout)["pending"], proc.stdout + proc.stderr
    (casruns_home / "blobs" / addr[:2] / addr[2:]).rmdir()  # the operator removes the stray
    assert rid in _json.loads(cli("reap", "--json", check=0).stdout)["collected"]
    assert _json.loads(cli("status", rid, "--json").stdout)["logs"]["stdout"]["size"] == 10


def test_scan_skips_strays_in_runs_as_every_reader_does(registry, casruns_home):
    import json as _json
    import os as _os

    from conftest import cli

    (casruns_home / "runs" / "01EMPTYSTRAY0000000000000000").mkdir()
    fifo_run = casruns_home / "runs" / "01FIFOSTRAY00000000000000000"
    fifo_run.mkdir()
    _os.mkfifo(fifo_run / "manifest.toml")
    proc = cli("scan", "--json", timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _json.loads(proc.stdout)["runs_scanned"] == 0
