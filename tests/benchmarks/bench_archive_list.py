"""Benchmark of ``casruns archive list`` on S3, without and with the archive's index (issue 18).

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_archive_list.py            # 10,000 archived runs
    .venv/bin/python tests/benchmarks/bench_archive_list.py --quick    # 1,000 archived runs

What it does
------------
1. **Builds an S3 archive** on a moto server this script starts in a thread on 127.0.0.1
   (loopback only; credentials ``testing``), reached through s3fs as a user's casruns would
   (``CASRUNS_S3_ENDPOINT``). One real run (submitted without a supervisor, cancelled, promoted)
   is pushed with ``Registry.archive_push``: that writes the marker, and its manifest is the
   template. N-1 more manifests are that template with a new run id, a ``created_at`` spread
   over a month, a ``suite`` label of 1 of 10 and every third promoted, serialized with
   ``manifest.dumps`` (so each carries its checksum) and PUT straight into ``runs/<id>/`` by
   16 boto3 threads. No blobs are written: ``archive list`` reads none.
2. **Times the real CLI** as fresh subprocesses (wall clock from spawn to exit, peak RSS from
   ``wait4``): ``casruns --root R archive list s3://... --json`` with no ``index/`` (one GET per
   manifest), then, after one segment with an entry for every run is written (versions from the
   ``runs/`` listing, 8 blob addresses an entry so the segment has a realistic size), the same
   list again (a few requests), and the same list with ``--label suite=s3 --promoted``. Then
   10% of the manifests are rewritten (a promotion flipped) so their entries are stale, and the
   list runs once more (the stale ones are read).
3. **Prints** wall time, peak RSS and the requests the server answered per step (HEAD, GET,
   LIST, PUT: counted from its request log, which is not printed), and checks that the listings
   with and without the index are the same runs with the same fields. ``python -c pass`` and
   ``casruns --help`` are the start-up floors. The moto server runs inside this process and
   shares the CPUs with the CLI under test, so the figures include the server's own cost.

Temp dirs are deleted and the server stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed  # noqa: E402 - shared with the other benchmarks
from bench_archive import CASRUNS, PY, S3, floor  # noqa: E402 - the moto server with its request counter

from casruns import Registry, archiveindex  # noqa: E402
from casruns import manifest as mf  # noqa: E402
from casruns.archive import manifest_key, open_remote  # noqa: E402
from casruns.ids import new_run_id  # noqa: E402
from casruns.timefmt import format_ts  # noqa: E402

THREADS = 16


def build(reg: Registry, s3: S3, bucket: str, n: int) -> tuple[str, list[str]]:
    """An archive of ``n`` runs at ``s3://bucket/fleet``: one pushed for real, n-1 synthetic."""
    url = f"s3://{bucket}/fleet"
    rid = reg.submit(["true"], spawn=False, labels={"suite": "s0"})["run_id"]
    reg.cancel(rid)
    reg.promote(rid, reason="template")
    reg.archive_push(url, [rid])
    template = reg.run_dir(rid).read_fresh()
    rng = random.Random(18)
    start = time.time() - 30 * 86400
    bodies = {}
    for i in range(n - 1):
        m = json.loads(json.dumps(template))
        m["run_id"] = new_run_id()
        m["created_at"] = format_ts(start + rng.uniform(0, 30 * 86400))
        m["labels"] = {"suite": f"s{i % 10}"}
        m["retention"] = dict(m.get("retention") or {}, promoted=i % 3 == 0)
        bodies[m["run_id"]] = mf.dumps(m)

    def put(item):
        key, data = item
        s3.client.put_object(Bucket=bucket, Key=f"fleet/{manifest_key(key)}", Body=data)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(put, bodies.items()))
    return url, [rid, *bodies]


def index(reg: Registry, url: str) -> tuple[int, float]:
    """One segment with an entry for every archived run, as push and gc would leave it."""
    from casruns.archive import remote_manifest

    remote = open_remote(url, reg)
    rng = random.Random(7)
    versions = {o.key.split("/")[1]: o.version for o in remote.objects("runs") if o.key.endswith("/manifest.toml")}
    entries = []
    for rid, version in versions.items():
        m = remote_manifest(remote, rid)
        blobs = [f"{rng.getrandbits(256):064x}" for _ in range(8)]
        entries.append(archiveindex.entry(rid, version, m, blobs, reg.config))
    key = archiveindex.append(remote, "bench", entries)
    return len(entries), remote.size(key) / (1 << 20)


def step(what: str, reg: Registry, url: str, s3: S3, env: dict, *args: str) -> dict:
    s3.requests.clear()
    wall, rss, code, out, err = timed([CASRUNS, "--root", str(reg.root), "archive", "list", url, "--json", *args], env)
    if code != 0:
        print(f"    ! archive list exited {code}: {err.strip()[-800:]}", flush=True)
    total = sum(s3.requests.values())
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(s3.requests.items()))
    report = json.loads(out) if out.strip() else {"runs": []}
    print(f"  {what:<52} {wall:8.2f} s  {rss:6.0f} MiB  {total:7,} requests ({kinds}); {len(report['runs']):,} runs listed", flush=True)
    return {"wall": wall, "requests": total, "report": report}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 runs instead of 10,000")
    ap.add_argument("--runs", type=int, help="number of runs (overrides --quick)")
    args = ap.parse_args()
    n = args.runs or (1000 if args.quick else 10_000)

    la = os.getloadavg()
    print(f"casruns archive list benchmark: {n:,} archived runs on S3 (moto); {os.cpu_count()} CPUs; load average {la[0]:.2f}")
    print(f"python -c pass (start-up floor): {floor([PY, '-c', 'pass']) * 1e3:.1f} ms")
    print(f"casruns --help (CLI start-up floor): {floor([CASRUNS, '--help']) * 1e3:.1f} ms\n", flush=True)
    base = tempfile.mkdtemp(prefix="casruns-bench-archive-list-", dir="/work")
    s3 = None
    try:
        s3 = S3()
        env = s3.env
        os.environ.update(env)  # this process's own archive calls (build, index) reach the server too
        reg = Registry(os.path.join(base, "reg"))
        reg.init()
        bucket = s3.bucket()
        t0 = time.perf_counter()
        url, ids = build(reg, s3, bucket, n)
        print(f"built {len(ids):,} archived manifests in {time.perf_counter() - t0:.1f} s ({THREADS} PUT threads)", flush=True)

        plain = step("archive list, no index", reg, url, s3, env)
        t0 = time.perf_counter()
        entries, size = index(reg, url)
        print(f"wrote one index segment: {entries:,} entries, {size:.2f} MiB, in {time.perf_counter() - t0:.1f} s", flush=True)
        indexed = step("archive list, indexed", reg, url, s3, env)
        step("archive list --label suite=s3 --promoted, indexed", reg, url, s3, env, "--label", "suite=s3", "--promoted")
        same = plain["report"]["runs"] == indexed["report"]["runs"] and len(plain["report"]["runs"]) == n
        print(f"  same runs and fields with and without the index: {same}", flush=True)

        stale = ids[1 : 1 + n // 10]
        remote = open_remote(url, reg)
        from casruns.archive import remote_manifest

        def flip(rid):
            m = remote_manifest(remote, rid)
            m["retention"] = dict(m.get("retention") or {}, promoted=not (m.get("retention") or {}).get("promoted"))
            s3.client.put_object(Bucket=bucket, Key=f"fleet/{manifest_key(rid)}", Body=mf.dumps(m))

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(flip, stale))
        after = step(f"archive list, indexed, {len(stale):,} manifests rewritten", reg, url, s3, env)
        flipped = {r["run_id"]: r["promoted"] for r in after["report"]["runs"]}
        before = {r["run_id"]: r["promoted"] for r in plain["report"]["runs"]}
        print(f"  the rewritten runs show their new promotion: {all(flipped[r] != before[r] for r in stale)}", flush=True)
        print(f"\n  summary: {n:,} runs: {plain['requests']:,} requests, {plain['wall']:.2f} s without the index; "
              f"{indexed['requests']:,} requests, {indexed['wall']:.2f} s with it "
              f"({plain['wall'] / indexed['wall']:.1f}x faster)")
        la = os.getloadavg()
        print(f"  load average at the end: {la[0]:.2f}", flush=True)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
