"""Stress of the fleet archive's gc (issue 18, spec/archive-gc.md): several machines push while
archive gc runs in a loop, and pushers and gcs are killed (SIGKILL) and paused (SIGSTOP) at random
moments and at every fault point; then the archive must hold every promoted run byte for byte, and
no manifest may reference a missing blob. Also: pushers and gcs whose clocks are hours off
(libfaketime), and the targeted interleaving of race 2 (a push that skipped a blob gc then marks).

The random choices come from one seed: ``CASRUNS_STRESS_SEED`` (default 1818), printed on failure.
``CASRUNS_STRESS_SECONDS`` sets how long the concurrent phase lasts (default 6 s per archive kind; it runs on, up to 4x, until some gc has expired a run and removed a blob).
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from casruns import Registry, collect
from casruns import manifest as mf
from conftest import casruns_exe, cli, cli_json

pytest.importorskip("s3fs")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SEED = int(os.environ.get("CASRUNS_STRESS_SEED", "1818"))
SECONDS = float(os.environ.get("CASRUNS_STRESS_SECONDS", "6"))
LEASE, GRACE = 1.0, 2.0  # gc.lease, gc.grace: stale after 3 s
PUSH_FAULTS = ["archive_push_after_lease", "archive_push_before_manifest", "archive_push_blob"]
GC_FAULTS = ["archive_gc_after_lock", "archive_gc_mid_expire", "archive_gc_after_mark", "archive_gc_after_sweep_start",
             "archive_gc_mid_sweep", "archive_gc_after_sweep"]
T_BOOT = "2026-01-01T00:00:00Z"


# -- archives --------------------------------------------------------------------------------------


from test_archive import s3_server  # noqa: E402,F401 - the moto server fixture, shared


class Archive:
    """An archive's URL, the environment its CLI calls need, and a direct view of its objects
    (plain directory walks or s3fs: not casruns' own remote code)."""

    def __init__(self, url: str, env: dict, root: Path | None = None, fs=None, prefix: str | None = None) -> None:
        self.url, self.env, self.root, self.fs, self.prefix = url, env, root, fs, prefix

    def keys(self, under: str) -> set[str]:
        if self.fs is None:
            top = self.root / under
            out = set()
            for dirpath, _, files in os.walk(top):
                for f in files:
                    if not f.startswith(".tmp-") and f != ".cas-lock":
                        out.add(str(Path(dirpath, f).relative_to(self.root)))
            return out
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(f"{self.prefix}/{under}")
        except FileNotFoundError:
            return set()
        return {k[len(self.prefix) + 1:] for k in found}

    def read(self, key: str) -> bytes:
        if self.fs is None:
            return (self.root / key).read_bytes()
        return self.fs.cat_file(f"{self.prefix}/{key}")


@pytest.fixture(params=["dir", "s3"])
def archive(request, tmp_path):
    return make_archive(request.param, request, tmp_path)


def make_archive(kind: str, request, tmp_path: Path) -> Archive:
    if kind == "dir":
        root = tmp_path / "archive"
        return Archive(str(root), {}, root=root)
    endpoint = request.getfixturevalue("s3_server")
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    bucket = f"stress-{os.urandom(4).hex()}"
    fs.mkdir(bucket)
    return Archive(f"s3://{bucket}/fleet", {**KEYS, "CASRUNS_S3_ENDPOINT": endpoint}, fs=fs, prefix=f"{bucket}/fleet")


def dangling(arch: Archive) -> list[str]:
    """Every (manifest, blob) pair where an archived manifest references a blob the archive lacks,
    read straight from the objects: the invariant of spec/archive-gc.md."""
    import zstandard

    from casruns.tree import Tree

    blobs = {k.split("/")[1] + k.split("/")[2] for k in arch.keys("blobs") if k.count("/") == 2}
    out = []
    for key in sorted(arch.keys("runs")):
        if not key.endswith("/manifest.toml"):
            continue
        try:
            m = mf.loads(arch.read(key), key)
        except FileNotFoundError:
            continue  # removed by nobody: every process is stopped when this is called
        refs = [r["blake3"] for r in (m.get("logs") or {}).values() if isinstance(r, dict) and r.get("blake3")]
        tree = (m.get("artifacts") or {}).get("tree")
        if tree:
            refs.append(tree)
            if tree in blobs:
                raw = arch.read(f"blobs/{tree[:2]}/{tree[2:]}")
                refs += sorted(Tree.from_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(raw)).addresses())
        out += [f"{key} -> {a}" for a in refs if a not in blobs]
    return out


# -- machines --------------------------------------------------------------------------------------


def finished_run(reg: Registry, *, files: dict, stdout: bytes) -> str:
    """A succeeded run with real blobs, made without a supervisor (as tests/test_gc.py does)."""
    rid = reg.submit(["true"], spawn=False)["run_id"]
    run = reg.run_dir(rid)
    for name, data in files.items():
        p = Path(run.artifacts_dir) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    Path(run.spool("stdout")).write_bytes(stdout)
    with run.update() as m:
        mf.transition(m, "booting", T_BOOT)
    assert collect.finish(run, reg.store, "succeeded", exit_code=0)["status"] == "succeeded"
    return rid


class Machine:
    def __init__(self, home: Path, promoted: list[str], unpromoted: list[str]) -> None:
        self.home, self.promoted, self.unpromoted = home, promoted, unpromoted
        self.env = {"CASRUNS_HOME": str(home)}

    @property
    def runs(self) -> list[str]:
        return self.promoted + self.unpromoted


def make_machines(tmp_path: Path, n: int, rng: random.Random) -> list[Machine]:
    """``n`` registries whose runs share blobs: one artifact and one log in every machine's
    promoted runs, and artifacts, a log and a whole artifact tree shared only by the unpromoted
    runs of all machines (which the archive expires, so those shared blobs churn)."""
    common = rng.randbytes(40_000)
    churn = rng.randbytes(30_000)
    out = []
    for i in range(n):
        reg = Registry(tmp_path / f"machine{i}")
        reg.init()
        p0 = finished_run(reg, files={"common.bin": common, f"own{i}.txt": f"machine {i}\n".encode()}, stdout=b"shared line\n" * 200)
        p1 = finished_run(reg, files={f"promo{i}.bin": rng.randbytes(5_000)}, stdout=f"promoted {i}\n".encode() * 30)
        u0 = finished_run(reg, files={"churn.bin": churn, f"u{i}.txt": rng.randbytes(2_000)}, stdout=b"churn log\n" * 100)
        u1 = finished_run(reg, files={"common.bin": common, f"w{i}.bin": rng.randbytes(3_000)}, stdout=f"unpromoted {i}\n".encode() * 40)
        u2 = finished_run(reg, files={"churn.bin": churn}, stdout=b"churn log\n" * 100)  # its tree is every machine's
        for rid in (p0, p1):
            reg.promote(rid, reason="keep")
        out.append(Machine(reg.root, [p0, p1], [u0, u1, u2]))
    return out


def evidence(reg: Registry, rid: str) -> dict:
    out = {s: b"".join(reg.log_chunks(rid, s)) for s in ("stdout", "stderr", "transcript")}
    for e in reg.tree(rid).entries:
        out[e.path] = b"".join(reg.cat(rid, e.path))
    return out


# -- processes -------------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


class Hung(AssertionError):
    pass


def wait_stopped(proc: subprocess.Popen, timeout: float = 20.0) -> bool:
    """True once ``proc`` stopped itself (a ``stop`` fault); False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _state(proc.pid) == "T":
            return True
        time.sleep(0.01)
    raise Hung(f"process {proc.pid} neither stopped nor ended in {timeout}s")


def spawn(args: list, env: dict, fault: str | None = None, extra: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "CASRUNS_TEST_FAULT"}
    full.update(env)
    full.update(extra or {})
    full["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on a hung process prints every thread's stack
    if fault:
        full["CASRUNS_TEST_FAULT"] = fault
    return subprocess.Popen(casruns_exe() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full)


class Chaos:
    """The concurrent phase: per machine a thread pushing random subsets of its runs again and
    again, and gc threads running ``archive gc --wait``; each process may get a fault point
    (kill@N, or stop then continue or kill) or a SIGKILL after a random delay."""

    def __init__(self, arch: Archive, machines: list[Machine], seed: int, gcs: int = 2) -> None:
        self.arch, self.machines, self.seed = arch, machines, seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(self._pusher, i), daemon=True) for i in range(len(machines))]
        self.threads += [threading.Thread(target=self._guard, args=(self._gc, i), daemon=True) for i in range(gcs)]

    def _guard(self, fn, i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            with self.lock:
                self.errors.append(f"{fn.__name__}[{i}]: {type(e).__name__}: {e}")

    def _drive(self, rng: random.Random, kind: str, args: list, env: dict, faults: list[str]) -> None:
        fault = None
        roll = rng.random()
        if roll < 0.35:
            name = rng.choice(faults)
            action = rng.choice(["kill", "stop", "stop"]) if name != "archive_push_blob" else "kill"
            fault = f"{name}={action}@{rng.randint(1, 3)}"
        killer = rng.uniform(0.05, 1.5) if 0.35 <= roll < 0.6 else None
        t0 = time.monotonic()
        proc = spawn(args, env, fault)
        how = "ran"
        if killer is not None:
            try:
                proc.wait(timeout=killer)
            except subprocess.TimeoutExpired:
                proc.kill()
                how = f"killed after {killer:.2f}s"
        elif fault and "=stop" in fault:
            # faults.point fires on the N-th hit and on every hit after it: a push of several
            # runs stops before each later manifest too, so keep continuing it
            pauses = []
            while self._stopped(proc):
                pause = rng.uniform(0.1, 1.2)  # well under the stale limit of 3 lease periods
                time.sleep(pause)
                pauses.append(f"{pause:.2f}")
                if rng.random() < 0.2:
                    proc.kill()
                    how = f"stopped {'+'.join(pauses)}s, killed"
                    break
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.02)
                how = f"stopped {'+'.join(pauses)}s, continued"
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: the stacks go to stderr
            out, err = proc.communicate()
            how += ", HUNG (no end in 30 s; SIGABRT)"
            err = err[-6000:]
        entry = {"kind": kind, "args": [str(a) for a in args[2:]], "fault": fault, "how": how, "rc": proc.returncode,
                 "secs": round(time.monotonic() - t0, 2), "stderr": err.strip()[-6000:] if "HUNG" in how else err.strip()[-600:]}
        if proc.returncode == 0 and "--json" in args:
            try:
                entry["report"] = json.loads(out.splitlines()[-1])
            except (ValueError, IndexError):
                pass
        with self.lock:
            self.log.append(entry)

    @staticmethod
    def _stopped(proc: subprocess.Popen) -> bool:
        """wait_stopped, but a process that neither stops nor ends is left to the hang check."""
        try:
            return wait_stopped(proc, timeout=30)
        except Hung:
            return False

    def _pusher(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        m = self.machines[i]
        while not self.stop.is_set():
            # unpromoted runs are pushed again only now and then: the archive keeps a run at least
            # its retention after it last received it, so a run re-pushed every cycle never expires
            ids = rng.sample(m.promoted, rng.randint(1, len(m.promoted))) + [u for u in m.unpromoted if rng.random() < 0.1]
            self._drive(rng, "push", ["archive", "push", self.arch.url, *ids], {**self.arch.env, **m.env}, PUSH_FAULTS)
            time.sleep(rng.uniform(0, 0.2))

    def _gc(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + i)
        m = self.machines[i % len(self.machines)]
        time.sleep(i * 0.7)
        while not self.stop.is_set():
            self._drive(rng, "gc", ["archive", "gc", "--json", self.arch.url, "--wait"], {**self.arch.env, **m.env}, GC_FAULTS)
            time.sleep(rng.uniform(0, 0.3))

    def gc_reports(self) -> list[dict]:
        with self.lock:
            return [e.get("report") or {} for e in self.log if e["kind"] == "gc"]

    def run(self, seconds: float, longest: float) -> None:
        """At least ``seconds``; longer (up to ``longest``) until some gc has expired a run and
        removed a blob (with bad luck every gc is killed or finds the lock of a killed one)."""
        for t in self.threads:
            t.start()
        t0 = time.monotonic()
        time.sleep(seconds)
        while time.monotonic() - t0 < longest and not (
                any(r.get("runs_removed") for r in self.gc_reports()) and any(r.get("blobs_removed") for r in self.gc_reports())):
            time.sleep(0.2)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a chaos thread did not end"


def setup_archive(arch: Archive, machines: list[Machine]) -> None:
    first = machines[0]
    proc = cli("archive", "push", arch.url, first.promoted[0], env={**arch.env, **first.env})
    assert proc.returncode == 0, proc.stderr
    proc = cli("archive", "config", arch.url, "--set", "retention.succeeded=1s", "--set", f"gc.grace={GRACE:.0f}s",
               "--set", f"gc.lease={LEASE:.0f}s", env={**arch.env, **first.env})
    assert proc.returncode == 0, proc.stderr


def final_gc(arch: Archive, env: dict, attempts: int = 20) -> dict:
    """A gc that runs to its end: the lock of a killed gc goes stale after 3 lease periods.
    First the retention (1 s) of runs the chaos pushed last runs out: the archive keeps a run at
    least its retention after it last received it (S3's times step by whole seconds)."""
    time.sleep(2.1)
    for _ in range(attempts):
        proc, out = cli_json("archive", "gc", arch.url, "--wait", env={**arch.env, **env}, timeout=120)
        if proc.returncode == 0:
            return out[0]
        assert out and out[-1].get("error", {}).get("code") == "busy", (proc.returncode, proc.stdout, proc.stderr)
        time.sleep(LEASE)
    raise AssertionError("the gc lock never went stale")


def summary(log: list[dict]) -> str:
    lines = []
    for e in log:
        rep = e.get("report") or {}
        extra = f" removed runs={len(rep.get('runs_removed') or [])} blobs={rep.get('blobs_removed')} mark={rep.get('mark')}" if rep else ""
        lines.append(f"{e['kind']} {e['args'][:4]} fault={e['fault']} {e['how']} rc={e['rc']} {e['secs']}s{extra} {e['stderr'][-200:]!r}")
    return "\n".join(lines)


# -- the stress test -------------------------------------------------------------------------------


def test_pushes_and_gcs_killed_at_random_keep_every_promoted_run_whole(tmp_path, archive):
    rng = random.Random(SEED)
    machines = make_machines(tmp_path, 3, rng)
    setup_archive(archive, machines)
    chaos = Chaos(archive, machines, SEED)
    chaos.run(SECONDS, 4 * SECONDS)
    story = f"seed {SEED}\n" + summary(chaos.log)
    if os.environ.get("CASRUNS_STRESS_VERBOSE"):
        print(story)
    assert not chaos.errors, story + "\n" + "\n".join(chaos.errors)
    hung = [e for e in chaos.log if "HUNG" in e["how"]]
    assert not hung, "\n\n".join(f"{e['kind']} {e['args']} fault={e['fault']} {e['how']}:\n{e['stderr']}" for e in hung)
    # a push or gc that was neither killed nor given a fault ends cleanly (busy: another gc holds the lock)
    for e in chaos.log:
        if e["how"] == "ran" and not e["fault"]:
            assert e["rc"] == 0 or (e["kind"] == "gc" and '"busy"' in e["stderr"] + json.dumps(e.get("report"))) or e["rc"] == 5, story
        assert "Traceback" not in e["stderr"] or e["fault"] and "=error" in e["fault"], story
    # the invariant, before anything repairs the archive: every process has stopped now
    assert dangling(archive) == [], story
    gcs = chaos.gc_reports()
    assert sum(len(r.get("runs_removed") or []) for r in gcs) > 0, "the archive's gc never expired a run:\n" + story
    assert sum(r.get("blobs_removed") or 0 for r in gcs) > 0, "the archive's gc never removed a blob:\n" + story

    # a final clean push of every promoted run, from each machine, and a gc that runs to its end
    for m in machines:
        proc = cli("archive", "push", archive.url, *m.promoted, env={**archive.env, **m.env})
        assert proc.returncode == 0, proc.stderr
    report = final_gc(archive, machines[0].env)
    assert dangling(archive) == [], story
    held = {k.split("/")[1] for k in archive.keys("runs") if k.endswith("/manifest.toml")}
    promoted = {rid for m in machines for rid in m.promoted}
    unpromoted = {rid for m in machines for rid in m.unpromoted}
    assert promoted <= held, (sorted(promoted - held), report)
    assert not held & unpromoted, "an expired run survived the final gc: " + repr((sorted(held & unpromoted), report))
    for m in machines:
        mine = [rid for rid in m.runs if rid in held]
        proc = cli("verify", "--against", archive.url, "--read-data", *mine, env={**archive.env, **m.env})
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # every promoted run reads back byte for byte, pulled into a fresh registry
    fresh = tmp_path / "reader"
    proc = cli("archive", "pull", archive.url, env={**archive.env, "CASRUNS_HOME": str(fresh)})
    assert proc.returncode == 0, proc.stderr
    reader = Registry(fresh)
    for m in machines:
        source = Registry(m.home)
        for rid in m.promoted:
            assert evidence(reader, rid) == evidence(source, rid), rid
    assert reader.verify(read_data=True)["ok"]


# -- race 2, targeted: a push that skipped a blob gc then marks -----------------------------------


def _libfaketime() -> str | None:
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
    return found[0] if found else None


def faketime_env(shift: str | None) -> dict:
    """The environment that moves a process's clock by ``shift`` ("+3h", "-3h") with libfaketime."""
    if not shift:
        return {}
    return {"LD_PRELOAD": _libfaketime(), "FAKETIME": shift, "FAKETIME_NO_CACHE": "1"}


def blob_keys(arch: Archive) -> set[str]:
    return {k.split("/")[1] + k.split("/")[2] for k in arch.keys("blobs") if k.count("/") == 2}


class Race2:
    """Machine G archived run X, the only run referencing the shared blob S, and the archive's
    gc expired X and died before its mark: S is present and unreferenced. Then pushers (machine
    A, and B) start pushing runs that reference S (and T), skip it as present and unmarked, and
    stop (SIGSTOP) right before writing their manifests."""

    def __init__(self, tmp_path: Path, arch: Archive, *, lease: float, grace: float, pushers: int = 1) -> None:
        rng = random.Random(SEED)
        self.arch = arch
        self.shared = [rng.randbytes(20_000) for _ in range(pushers)]  # S (and T)
        g = Registry(tmp_path / "G")
        g.init()
        self.x = finished_run(g, files={f"s{i}.bin": s for i, s in enumerate(self.shared)} | {"x.bin": rng.randbytes(7_000)},
                              stdout=b"x only\n" * 50)
        self.g_env = {**arch.env, "CASRUNS_HOME": str(g.root)}
        self.pushers = []
        for i in range(pushers):
            reg = Registry(tmp_path / f"P{i}")
            reg.init()
            rid = finished_run(reg, files={"s.bin": self.shared[i], "own.txt": f"pusher {i}\n".encode()}, stdout=f"p{i}\n".encode())
            reg.promote(rid, reason="keep")
            self.pushers.append((reg, rid))
        cli("archive", "push", arch.url, self.x, env=self.g_env, check=0)
        made = time.monotonic()  # retention counts from the archive's receipt at the earliest (store time)
        cli("archive", "config", arch.url, "--set", "retention.succeeded=1s", "--set", f"gc.grace={grace:g}s",
            "--set", f"gc.lease={lease:g}s", env=self.g_env, check=0)
        self.s_addr = [g.tree(self.x).get(f"s{i}.bin").blake3 for i in range(pushers)]
        self.x_own = g.tree(self.x).get("x.bin").blake3
        time.sleep(max(0.0, made + 2.1 - time.monotonic()))  # X's retention (1 s) is up (S3 times have 1 s steps)
        # gc expires X, then fails before its mark (its lock is released on the way out)
        proc = cli("archive", "gc", arch.url, env={**self.g_env, "CASRUNS_TEST_FAULT": "archive_gc_mid_expire=error"})
        assert proc.returncode != 0 and "fault injected" in proc.stderr, proc.stderr
        assert not any(k.endswith("/manifest.toml") for k in arch.keys("runs")), "X was not expired"
        assert not [k for k in arch.keys("gc/marks")] and not arch.keys("gc/lock")
        assert set(self.s_addr) <= blob_keys(arch)

    def start_pushes(self, shifts: list[str | None]) -> list[subprocess.Popen]:
        procs = []
        for (reg, rid), shift in zip(self.pushers, shifts):
            proc = spawn(["archive", "push", "--json", self.arch.url, rid], {**self.arch.env, "CASRUNS_HOME": str(reg.root)},
                         "archive_push_before_manifest=stop", faketime_env(shift))
            procs.append(proc)
        for proc in procs:
            assert wait_stopped(proc), proc.communicate()
        return procs

    def finish_pushes(self, procs: list[subprocess.Popen]) -> list[dict]:
        reports = []
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.splitlines()[-1]))
        return reports

    def check_pushed_runs(self) -> None:
        assert dangling(self.arch) == []
        assert set(self.s_addr) <= blob_keys(self.arch)
        for (reg, rid), s in zip(self.pushers, self.shared):
            env = {**self.arch.env, "CASRUNS_HOME": str(reg.root)}
            got = subprocess.run(casruns_exe() + ["archive", "cat", self.arch.url, rid, "s.bin"], capture_output=True,
                                 env={**os.environ, **env}, timeout=60)
            assert got.returncode == 0 and got.stdout == s, got.stderr
            assert cli("verify", "--against", self.arch.url, "--read-data", rid, env=env).returncode == 0


def test_gc_waits_for_a_push_that_skipped_a_blob_before_the_mark(tmp_path, archive):
    """spec/archive-gc.md, race 2: the push's lease existed at the mark, so gc must wait for it."""
    race = Race2(tmp_path, archive, lease=2, grace=0)
    (push,) = race.start_pushes([None])
    leases = archive.keys("pushes")
    assert len(leases) == 1
    proc, out = cli_json("archive", "gc", archive.url, env=race.g_env)
    assert proc.returncode == 0, proc.stderr
    mark = out[0]["mark"]
    assert mark["state"] == "waiting" and mark["reason"] == "pushes" and mark["leases"] == sorted(leases), out[0]
    assert out[0]["blobs_removed"] == 0 and set(race.s_addr) <= blob_keys(archive)
    (report,) = race.finish_pushes([push])
    assert report["runs"] == 1 and report["blobs_skipped"] >= 1
    proc, out = cli_json("archive", "gc", archive.url, "--wait", env=race.g_env, timeout=60)
    # the open mark is swept (then a new one finds nothing: the report shows the last mark)
    assert proc.returncode == 0 and out[0]["blobs_removed"] >= 1 and not archive.keys("gc/marks"), out
    assert race.x_own not in blob_keys(archive)  # the sweep really ran
    race.check_pushed_runs()


@pytest.mark.skipif(_libfaketime() is None, reason="libfaketime is not installed (apt-get install faketime; .ci/run installs it)")
@pytest.mark.parametrize("kind, gc_shift", [("dir", "+3h"), ("s3", "-3h")])
def test_clock_skew_of_pushers_and_gc_never_loses_a_blob_a_push_needs(tmp_path, request, kind, gc_shift):
    """Pushers 3 h ahead and 3 h behind, and a gc whose own clock is 3 h off too: every time gc
    compares is the store's, so it waits for both paused pushes (S3: the one case that takes
    the longest, to keep the file's wall time down)."""
    archive = make_archive(kind, request, tmp_path)
    race = Race2(tmp_path, archive, lease=2, grace=0, pushers=2)
    procs = race.start_pushes(["+3h", "-3h"])
    gc = spawn(["archive", "gc", "--json", archive.url, "--wait"], race.g_env, None, faketime_env(gc_shift))
    deadline = time.monotonic() + 20
    while not any(k.endswith(".leases") for k in archive.keys("gc/marks")):
        assert gc.poll() is None and time.monotonic() < deadline, gc.communicate()
        time.sleep(0.05)
    time.sleep(1.2)  # gc judges the leases (it polls every second): both live, both listed at the mark
    assert gc.poll() is None, "gc did not wait for the paused pushes: " + repr(gc.communicate())
    assert set(race.s_addr) <= blob_keys(archive)
    race.finish_pushes(procs)
    out, err = gc.communicate(timeout=60)
    assert gc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["blobs_removed"] >= 1 and not archive.keys("gc/marks"), report
    assert race.x_own not in blob_keys(archive)
    race.check_pushed_runs()


def push_in_thread(reg: Registry, url: str, rid: str, result: dict) -> threading.Thread:
    """``archive push`` of one run on a thread; its report (or its error) lands in ``result``."""
    def push():
        try:
            result["report"] = reg.archive_push(url, [rid])
        except Exception as e:  # noqa: BLE001 - the test looks at what it left
            result["error"] = e

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    return pusher


# -- defects found by this stress work (each was a strict xfail until its fix landed) -------------


def test_a_push_paused_for_less_than_three_lease_periods_after_failed_lease_rewrites_keeps_its_blobs(tmp_path, monkeypatch):
    import casruns.archiveproto as proto
    import casruns.faults as faults

    arch = make_archive("dir", None, tmp_path)
    race = Race2(tmp_path, arch, lease=LEASE, grace=0)
    reg, rid = race.pushers[0]
    real_write, real_point = proto.Refresher._write, faults.point
    state = {"lease": None}
    at_blob, at_manifest, release = threading.Event(), threading.Event(), threading.Event()

    def flaky_write(self):
        if self.key.startswith(proto.LEASES + "/") and self.n >= 1:
            self.n += 1
            raise OSError("503 SlowDown (simulated: the store throttles the lease's rewrites)")
        real_write(self)
        state["lease"] = self

    def point(name):
        lease = state["lease"]
        if name == "archive_push_blob" and not at_blob.is_set():
            at_blob.set()  # the marks are read: S was skipped as present and unmarked
            while time.monotonic() - lease.last_ok < 1.75 * LEASE:
                time.sleep(0.01)
        elif name == "archive_push_before_manifest":
            state["paused"] = time.monotonic()
            at_manifest.set()
            release.wait(60)  # the whole process stopped here (SIGSTOP, swapped out, a VM paused)
        else:
            real_point(name)

    monkeypatch.setattr(proto.Refresher, "_write", flaky_write)
    monkeypatch.setattr(faults, "point", point)
    result: dict = {}
    pusher = push_in_thread(reg, arch.url, rid, result)
    assert at_blob.wait(30)
    gc = spawn(["archive", "gc", "--json", arch.url, "--wait"], race.g_env)
    # The lease went 1.75 periods without a rewrite: past the push's safe gap, so before its
    # manifest it must renew and look again. The store refuses every rewrite, so the renewal
    # fails and the push must end without writing a manifest (or, had it renewed, with its
    # blobs all present): never with a manifest naming a swept blob.
    reached = at_manifest.wait(15)
    gc.communicate(timeout=60)
    release.set()
    pusher.join(60)
    if reached:
        assert result.get("report", {}).get("runs") == 1
    else:
        assert "report" not in result and result["error"].code == "archive_unavailable" and not pusher.is_alive()
        assert not [k for k in arch.keys("runs") if k.endswith("/manifest.toml")], "no manifest without a live lease"
    assert dangling(arch) == []


def test_archive_retention_does_not_depend_on_the_source_machines_clock(tmp_path):
    arch = make_archive("dir", None, tmp_path)
    reg = Registry(tmp_path / "behind")
    reg.init()
    rid = finished_run(reg, files={"f.txt": b"f\n"}, stdout=b"out\n")
    from casruns.timefmt import format_ts

    with reg.run_dir(rid).update() as m:
        m["finished_at"] = format_ts(time.time() - 3 * 3600)  # what a machine 3 h behind writes
    env = {**arch.env, "CASRUNS_HOME": str(reg.root)}
    cli("archive", "push", arch.url, rid, env=env, check=0)
    cli("archive", "config", arch.url, "--set", "retention.succeeded=1h", env=env, check=0)
    proc, out = cli_json("archive", "gc", arch.url, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out[0]["runs_removed"] == [], "pushed a second ago, kept for 1 h, removed now: " + repr(out[0]["runs_removed"])


def test_a_push_whose_lease_rewrites_failed_for_a_while_rechecks_what_it_skipped(tmp_path, monkeypatch):
    import casruns.archiveproto as proto
    import casruns.faults as faults

    arch = make_archive("dir", None, tmp_path)
    race = Race2(tmp_path, arch, lease=LEASE, grace=0)
    reg, rid = race.pushers[0]
    real_write, real_point = proto.Refresher._write, faults.point
    state: dict = {}
    at_blob, go_on = threading.Event(), threading.Event()

    def flaky_write(self):
        if self.key.startswith(proto.LEASES + "/"):
            first = state.setdefault("first", time.monotonic())
            if self.n >= 1 and time.monotonic() - first < 4.5 * LEASE:  # a throttled prefix, a flapping route
                self.n += 1
                raise OSError("503 SlowDown (simulated)")
            state["lease"] = self
        real_write(self)

    def point(name):
        if name == "archive_push_blob" and not at_blob.is_set():
            at_blob.set()  # S was skipped; this worker is busy with a slow upload for a while
            go_on.wait(60)
        else:
            real_point(name)

    monkeypatch.setattr(proto.Refresher, "_write", flaky_write)
    monkeypatch.setattr(faults, "point", point)
    result: dict = {}
    pusher = push_in_thread(reg, arch.url, rid, result)
    assert at_blob.wait(30)
    gc = spawn(["archive", "gc", "--json", arch.url, "--wait"], race.g_env)
    out, err = gc.communicate(timeout=60)
    assert gc.returncode == 0, err
    deadline = time.monotonic() + 20
    while not (time.monotonic() - state["first"] > 4.5 * LEASE and state["lease"].last_ok - state["first"] > 4.5 * LEASE):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go_on.set()  # the upload ends; the lease is being rewritten again
    pusher.join(60)
    assert result["report"]["runs"] == 1
    assert dangling(arch) == [], "gc report: " + out


def test_a_push_does_not_wait_for_ever_on_the_sweep_object_of_a_dead_gc(tmp_path):
    arch = make_archive("dir", None, tmp_path)
    race = Race2(tmp_path, arch, lease=LEASE, grace=0)
    proc = cli("archive", "gc", arch.url, env={**race.g_env, "CASRUNS_TEST_FAULT": "archive_gc_after_sweep_start=kill"})
    assert proc.returncode == -9 and arch.keys("gc/sweeping") and set(race.s_addr) <= blob_keys(arch)
    reg, rid = race.pushers[0]
    t0 = time.monotonic()
    try:
        proc = cli("archive", "push", arch.url, rid, env={**arch.env, "CASRUNS_HOME": str(reg.root)}, timeout=2 * 3 * LEASE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the push did not end in {time.monotonic() - t0:.1f}s (one dead sweep takes 3 lease periods to judge)")
    assert proc.returncode == 0, proc.stderr
    assert dangling(arch) == []
