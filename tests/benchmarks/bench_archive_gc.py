"""Benchmark of the fleet archive's protocol costs: S3 requests of ``archive push``, and ``archive gc``
at scale, against a moto S3 server on loopback (spec/archive-gc.md, "Costs on paper").

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_archive_gc.py            # gc of 10,000 runs / 100,000 blobs
    .venv/bin/python tests/benchmarks/bench_archive_gc.py --quick    # gc of 1,000 runs / 10,000 blobs

What it does
------------
(a) **Requests per pushed run.** For runs with N artifacts (N = 1, 10, 100; ``--quick``: 1, 10), a
    registry makes one succeeded run (no supervisor: the blobs are stored by ``collect.finish``),
    and ``casruns.Registry(...).archive_push`` runs *in this process* (the CLI would run it in a
    subprocess, where it cannot be counted) against ``s3://<bucket>/fleet``: first push, then the
    same push again. Every S3 call is counted by wrapping ``s3fs.S3FileSystem._call_s3`` (the one
    place s3fs sends requests from), per operation. A third push runs with an open gc mark that
    lists every blob of the run (so every present blob is touched): the cost of race 3.

(b) **gc at scale.** One real run is pushed; its manifest is loaded with
    ``casruns.manifest.loads`` and copied R times with a new run id and three log blobs of its own
    (stdout, stderr, transcript: synthetic addresses), its artifact tree shared; ``dumps`` writes
    each copy with a valid checksum. Blobs are small synthetic objects (gc never reads a blob
    except an artifact tree): 3R referenced, the rest up to B unreferenced. Everything is written
    straight into moto's in-process backend (fast); gc reads it through s3fs like any user.
    Then, in process, ``archive gc`` with ``gc.grace=1h`` (phase: **mark**; it stops at
    ``waiting``), then ``gc.grace=0s`` and ``archive gc`` again (phase: **sweep**; it resumes the
    mark and deletes the unreferenced blobs, then looks for a new mark, which finds none). Each
    phase is timed, its S3 requests counted, and the time inside gc's own steps (reading
    manifests, listing blobs, deleting) broken out.

Floors, measured in the same run: ``python -c pass`` (a fresh process), one plain s3fs
``find`` of ``blobs/`` (what any listing of every blob costs), and one GET of every manifest
in a loop of plain s3fs ``cat_file`` calls (what reading them costs without casruns).

The moto server runs in this process and shares the 2 CPUs with the code under test, so every
S3 figure includes the server's own cost (in-memory, no network). Temp dirs are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_archive import LOOPBACK, S3_KEYS  # noqa: E402 - the credentials moto accepts, shared
T_BOOT = "2026-01-01T00:00:00Z"


# -- counting S3 requests -----------------------------------------------------------------------


class Requests:
    """Counts every s3fs request (by operation) while installed."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._orig = None

    def install(self) -> None:
        import s3fs

        orig = self._orig = s3fs.S3FileSystem._call_s3
        counts = self.counts

        async def counting(fs, method, *args, **kwargs):
            counts[method if isinstance(method, str) else getattr(method, "__name__", str(method))] += 1
            return await orig(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counting

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.counts)

    @staticmethod
    def diff(after: collections.Counter, before: collections.Counter) -> collections.Counter:
        return collections.Counter({k: after[k] - before[k] for k in after if after[k] - before[k]})


def fmt(c: collections.Counter) -> str:
    return f"{sum(c.values()):>7} ({', '.join(f'{k} {v}' for k, v in sorted(c.items(), key=lambda kv: -kv[1]))})"


# -- the server and the archive -----------------------------------------------------------------


@contextlib.contextmanager
def moto_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.stop()


def new_bucket(fs) -> str:
    bucket = f"bench-{os.urandom(4).hex()}"
    fs.mkdir(bucket)
    return bucket


def finished_run(reg, *, files: dict, stdout: bytes) -> str:
    from casruns import collect
    from casruns import manifest as mf

    rid = reg.submit(["true"], spawn=False)["run_id"]
    run = reg.run_dir(rid)
    for name, data in files.items():
        p = Path(run.artifacts_dir) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    Path(run.spool("stdout")).write_bytes(stdout)
    with run.update() as m:
        mf.transition(m, "booting", T_BOOT)
    collect.finish(run, reg.store, "succeeded", exit_code=0)
    return rid


# -- (a) requests per pushed run ----------------------------------------------------------------


def bench_push(fs, req: Requests, work: Path, sizes: list[int]) -> None:
    from casruns import Registry
    from casruns import archiveproto as proto
    from casruns.archive import _run_blobs

    print("\n(a) S3 requests per pushed run (in-process Registry.archive_push; blobs = artifacts + logs + tree)")
    print(f"  {'artifacts':>9} {'blobs':>5}  {'step':<28} {'wall s':>7}  requests")
    for n in sizes:
        rng = random.Random(n)
        reg = Registry(work / f"push-{n}")
        reg.init()
        rid = finished_run(reg, files={f"a/f{i}.txt": rng.randbytes(200) for i in range(n)}, stdout=b"log line\n" * 100)
        blobs = len(_run_blobs(reg, reg.run_dir(rid).read_fresh()))
        bucket = new_bucket(fs)
        url = f"s3://{bucket}/fleet"
        for step in ("first push", "re-push (all present)", "push under an open mark"):
            if step == "push under an open mark":
                m = reg.run_dir(rid).read_fresh()
                fs.pipe_file(f"{bucket}/fleet/{proto.MARKS}/bench.json", proto.dump({"candidates": _run_blobs(reg, m)}))
                fs.pipe_file(f"{bucket}/fleet/{proto.MARKS}/bench.leases", proto.dump({"leases": []}))
            before = req.snapshot()
            t0 = time.perf_counter()
            report = reg.archive_push(url, [rid])
            wall = time.perf_counter() - t0
            c = Requests.diff(req.snapshot(), before)
            extra = f"  sent {report['blobs_sent']} skipped {report['blobs_skipped']} touched {report['blobs_touched']}"
            print(f"  {n:>9} {blobs:>5}  {step:<28} {wall:>7.2f} {fmt(c)}{extra}", flush=True)


# -- (b) gc at scale ----------------------------------------------------------------------------


def synthesize(fs, work: Path, runs: int, blobs: int) -> tuple[str, str, list[str]]:
    """An archive of ``runs`` runs (copies of one real pushed manifest) and ``blobs`` blobs;
    returns (bucket, url, the manifest keys)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from casruns import Registry
    from casruns import manifest as mf
    from casruns.ids import new_run_id

    reg = Registry(work / "gc-source")
    reg.init()
    rid = finished_run(reg, files={"report.txt": b"ok\n"}, stdout=b"source\n")
    bucket = new_bucket(fs)
    url = f"s3://{bucket}/fleet"
    reg.archive_push(url, [rid])
    base = mf.loads(fs.cat_file(f"{bucket}/fleet/runs/{rid}/manifest.toml"), "the pushed manifest")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    rng = random.Random(18)
    frame = b"(\xb5/\xfd\x00\x00\x01\x00\x00"  # gc never reads a log blob: any small object will do
    keys = []
    used = 0
    t0 = time.perf_counter()
    for i in range(runs):
        m = dict(base)
        m["run_id"] = new_run_id()
        logs = {}
        for stream in ("stdout", "stderr", "transcript"):
            address = rng.randbytes(32).hex()
            logs[stream] = {**(base["logs"].get("stdout") or {}), "blake3": address}
            backend.put_object(bucket, f"fleet/blobs/{address[:2]}/{address[2:]}", frame)
            used += 1
        m["logs"] = logs
        key = f"fleet/runs/{m['run_id']}/manifest.toml"
        backend.put_object(bucket, key, mf.dumps(m))
        keys.append(key)
    for _ in range(max(0, blobs - used)):
        address = rng.randbytes(32).hex()
        backend.put_object(bucket, f"fleet/blobs/{address[:2]}/{address[2:]}", frame)
    fs.invalidate_cache()
    print(f"  synthesized {runs:,} runs and {max(blobs, used):,} blobs ({used:,} referenced) in {time.perf_counter() - t0:.1f} s")
    return bucket, url, keys


def bench_gc(fs, req: Requests, work: Path, runs: int, blobs: int) -> None:
    from casruns import Registry
    from casruns import archivegc

    print(f"\n(b) archive gc of {runs:,} runs / {blobs:,} blobs (in process; moto in process too)")
    bucket, url, keys = synthesize(fs, work, runs, blobs)
    reg = Registry(work / "gc-runner")
    reg.init()

    # floors
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    py = time.perf_counter() - t0
    before = req.snapshot()
    t0 = time.perf_counter()
    fs.invalidate_cache()
    listed = fs.find(f"{bucket}/fleet/blobs")
    find = time.perf_counter() - t0
    c_find = Requests.diff(req.snapshot(), before)
    before = req.snapshot()
    t0 = time.perf_counter()
    for key in keys:
        fs.cat_file(f"{bucket}/{key}")
    cat = time.perf_counter() - t0
    c_cat = Requests.diff(req.snapshot(), before)
    print(f"  floor: python -c pass                      {py:>8.2f} s")
    print(f"  floor: one s3fs find of blobs/ ({len(listed):,} keys) {find:>8.2f} s {fmt(c_find)}")
    print(f"  floor: s3fs cat_file of every manifest ({len(keys):,}) {cat:>8.2f} s {fmt(c_cat)}")

    # gc's own steps, timed from inside
    steps: dict[str, float] = collections.defaultdict(float)

    def timed_method(cls, name, label):
        orig = getattr(cls, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                steps[label] += time.perf_counter() - t

        setattr(cls, name, wrapper)

    timed_method(archivegc._Run, "read_runs", "read manifests")
    timed_method(archivegc._Run, "references", "references (trees)")
    remote_cls = None
    from casruns.remotes import FsspecRemote

    remote_cls = FsspecRemote
    orig_objects, orig_delete = remote_cls.objects, remote_cls.delete

    def objects(self, prefix):
        t = time.perf_counter()
        try:
            return orig_objects(self, prefix)
        finally:
            steps["list " + (prefix if prefix in ("blobs", "runs") else "small prefixes")] += time.perf_counter() - t

    def delete(self, keys_):
        t = time.perf_counter()
        try:
            return orig_delete(self, keys_)
        finally:
            steps["delete"] += time.perf_counter() - t

    remote_cls.objects, remote_cls.delete = objects, delete
    try:
        for phase, grace in (("mark", "1h"), ("sweep", "0s")):
            reg.archive_config(url, [f"gc.grace={grace}", "gc.lease=60s"])
            steps.clear()
            before = req.snapshot()
            t0 = time.perf_counter()
            report = reg.archive_gc(url)
            wall = time.perf_counter() - t0
            c = Requests.diff(req.snapshot(), before)
            mark = report.get("mark") or {}
            print(f"  phase {phase:<5} (gc.grace={grace}): {wall:>8.2f} s {fmt(c)}")
            print(f"      report: blobs_removed {report['blobs_removed']:,}, mark {mark.get('state')} "
                  f"({mark.get('candidates', 0):,} candidates)")
            print("      inside: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])))
    finally:
        remote_cls.objects, remote_cls.delete = orig_objects, orig_delete
    fs.invalidate_cache()
    left = len(fs.find(f"{bucket}/fleet/blobs"))
    print(f"  blobs left after the sweep: {left:,} (expected {3 * runs + 3:,}: the runs' logs and the source run's blobs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="gc of 1,000 runs / 10,000 blobs; pushes of 1 and 10 artifacts")
    ap.add_argument("--runs", type=int, help="runs for (b) (overrides --quick)")
    ap.add_argument("--blobs", type=int, help="blobs for (b) (overrides --quick)")
    args = ap.parse_args()
    runs = args.runs or (1000 if args.quick else 10000)
    blobs = args.blobs or (10000 if args.quick else 100000)
    sizes = [1, 10] if args.quick else [1, 10, 100]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(S3_KEYS)
    work = Path(tempfile.mkdtemp(prefix="bench-archive-gc-", dir="/work" if os.path.isdir("/work") else None))
    try:
        with moto_server() as endpoint:
            os.environ["CASRUNS_S3_ENDPOINT"] = endpoint
            os.environ["CASRUNS_HOME"] = str(work / "home")
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
            req = Requests()
            req.install()
            print(f"moto S3 server on {endpoint} (in this process); python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
            bench_push(fs, req, work, sizes)
            bench_gc(fs, req, work, runs, blobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
