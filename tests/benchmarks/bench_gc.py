"""Benchmark of ``casruns gc`` and ``casruns verify`` on large registries.

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_gc.py            # 5,000/50,000 and 10,000/100,000
    .venv/bin/python tests/benchmarks/bench_gc.py --quick    # 1,000/10,000 and 2,000/20,000
    .venv/bin/python tests/benchmarks/bench_gc.py --profile  # cProfile gc even if it meets its target
    .venv/bin/python tests/benchmarks/bench_gc.py --packed   # blobs in packs: gc rewrites half-garbage packs

What it does
------------
1. **Builds two registries** (runs / blobs) under ``tempfile.mkdtemp(dir="/work")``,
   without supervisors and without ``collect.finish``. Blobs are written through real
   ``DiskStore`` batches (``with store.batch() as b: b.put_bytes(...)``, synced per batch);
   each run gets its own stdout, stderr and transcript log blobs, an artifact tree built
   with ``Tree``/``TreeEntry`` and stored in the batch, five files of its own and one file
   drawn from a shared pool (each pool blob is used by about two runs, some by runs that
   gc removes and runs it keeps). A further 5% of the blobs are orphans (referenced by no
   run, as a crashed writer leaves them). So a run references 10 blobs, and there are
   exactly 10 blobs per run.

   Manifests: one ``Registry.submit(spawn=False)`` gives a real queued manifest (then that
   run is removed); every bulk run is a copy of it with its own id, times, labels and argv,
   walked queued -> booting -> running -> collecting -> terminal with
   ``manifest.transition`` and given the fields ``collect.finish`` writes (``logs`` refs
   with sizes, ``artifacts`` ``{tree, files, bytes}``, ``exit_code``, ``heartbeat_at``,
   ``last_activity_at``). It is written once, already terminal, with ``runs.create``
   (atomic, durable, with its JSON read cache); the empty workspace is then removed, as
   ``collect.finish`` does. That is the same file ``runs.create`` + ``manifest.write``
   would leave, with one durable write instead of two.

   Retention: ``config.toml`` sets ``gc_grace = "0s"`` and ``[retention] succeeded = "1d"``.
   Half the runs finished 30 days ago and are eligible (a tenth of those are ``failed``:
   the default 7 days applies); 10% finished as long ago but are promoted, 5% carry
   ``retain_for`` 90 days, and 35% finished two hours ago. Every run carries the first
   sighting (``gc-seen.json``) a gc would have recorded a minute after it finished, without a
   boot id (so the wall clock measures the hold). The builder computes what gc
   must remove (runs, blobs, bytes) and the report is checked against it.

2. **Times the real CLI** as a fresh subprocess (wall clock from spawn to exit, peak RSS
   from ``wait4``; the registry is built in a forked child so this process' own peak, which
   Linux carries into children's ``ru_maxrss``, stays small). Before each step an untimed
   ``sync`` flushes dirty pages, so no step pays for another's writeback. The read-only
   steps (verify) run ``--repeat`` times (default 2) and the fastest is reported. In this
   order on each registry:
   ``verify --json`` and ``verify --read-data --json`` on the full registry,
   ``gc --json`` (removes half the runs and their blobs), a second ``gc --json`` (nothing
   to remove: the cost of listing runs, marking and sweeping alone), and ``verify --json``
   after gc (must be ok, with no orphans left). ``python -c pass`` is the start-up floor.
   The page cache is warm (the registry was just written); it cannot be dropped here.

3. **Prints** each step's time, (runs + blobs) per second, and the ratio of the time at
   the large size to the small one (linear growth gives ~2x), with the target beside it:
   gc of 10,000 runs / 100,000 blobs under 30 s on this 2-core machine. When gc misses its
   target (or with ``--profile``), a third registry of the small size is built and its gc
   is run in-process under cProfile; the top functions are printed.

The registries are deleted at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from casruns import Registry, locking, retention, runs, scheduler
from casruns import manifest as mf
from casruns.ids import new_run_id
from casruns.store import DiskStore
from casruns.timefmt import format_ts, parse_ts
from casruns.tree import Tree, TreeEntry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed  # noqa: E402 - shared with the other benchmarks

PY = sys.executable
CASRUNS = os.path.join(os.path.dirname(PY), "casruns")

GC_TARGET_S = 30.0  # gc of 10,000 runs / 100,000 blobs (printed, never asserted)
TARGET_RUNS = 10_000
BLOBS_PER_RUN = 10
BATCH_RUNS = 250  # runs whose blobs go into one store batch
# Loose by default: a real run ingests its logs (3 blobs) and its artifacts here (5 files, a
# shared one and the tree: 7) in batches of at most 8, which stay loose. ``--packed`` stores
# each build batch's blobs in packs instead (250 runs' blobs share packs), so gc must rewrite
# packs that are half garbage: the worst case for packs.
PACKED = False
DAY = 86400.0

SUITES = ["unit", "integration", "e2e", "lint"]
BRANCHES = ["main", "release-1.4", "feature/gc", "renovate/zstandard"]
LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR"]
WORDS = "cache fetch resolve compile link test assert retry connect upload shard worker queue lock sync".split()


# -- building -------------------------------------------------------------------------------------


def _log(rng: random.Random, tag: str, lines: int) -> bytes:
    out = []
    for j in range(lines):
        out.append(
            f"2026-01-{1 + j % 28:02d}T12:{j % 60:02d}:{rng.randrange(60):02d}.{rng.randrange(10**6):06d}Z "
            f"{rng.choice(LEVELS):<7} {tag} {rng.choice(WORDS)} {rng.choice(WORDS)} id={rng.getrandbits(48):012x} "
            f"took {rng.randrange(1, 5000)}ms\n"
        )
    return "".join(out).encode()


def _category(i: int) -> str:
    """What retention does to run i: half eligible, the rest kept for three reasons."""
    k = i % 20
    if k < 9:
        return "old"  # succeeded 30 days ago: eligible (1d)
    if k == 9:
        return "old_failed"  # failed 30 days ago: eligible (default 7d)
    if k < 12:
        return "promoted"  # 30 days ago, promoted: kept
    if k == 12:
        return "retain_for"  # 30 days ago, retain_for 90d: kept
    return "recent"  # succeeded 2 hours ago: kept


def build_registry(root: str, n_runs: int, seed: int = 1, workers: int = 4) -> dict:
    """A registry of ``n_runs`` terminal runs and ``10 * n_runs`` blobs; returns what gc must do.

    The work is split into tasks of ``BATCH_RUNS`` runs (one store batch each, then their
    manifests) run by ``workers`` forked processes: building is bound by fsync latency, which
    overlapping writers hide.
    """
    import multiprocessing

    import blake3

    rng = random.Random(seed)
    t0 = time.perf_counter()
    reg = Registry(root)
    reg.init()
    with open(os.path.join(root, "config.toml"), "w") as f:  # benchmark setup, outside casruns' writers
        f.write('gc_grace = "0s"\n\n[retention]\nsucceeded = "1d"\n')
    reg._config = None

    # A real queued manifest to copy (then the run itself is removed).
    rec = reg.submit(["pytest", "-q", "tests"], labels={"suite": "unit"}, timeout="30m", spawn=False)
    template = copy.deepcopy(reg.run_dir(rec["run_id"]).read_fresh())
    scheduler.dequeue(reg.root, rec["run_id"])
    shutil.rmtree(reg.run_dir(rec["run_id"]).path)

    now = time.time()
    pool_size = max(1, n_runs // 2)
    n_orphans = BLOBS_PER_RUN * n_runs - (9 * n_runs + pool_size)  # 3 logs + tree + 5 own files per run
    # The shared pool's addresses are known before anything is written, so run tasks can
    # reference pool blobs that another task stores.
    pool_data = [f"# lock file {p}\n".encode() + _log(rng, f"pool{p}", 4) for p in range(pool_size)]
    pool = [(blake3.blake3(d).hexdigest(), len(d)) for d in pool_data]
    tasks: list[tuple] = []
    for k in range(0, pool_size, 10 * BATCH_RUNS):
        tasks.append(("blobs", root, pool_data[k : k + 10 * BATCH_RUNS], None))
    for k in range(0, n_orphans, 10 * BATCH_RUNS):
        tasks.append(("blobs", root, [f"orphan {o}\n".encode() + _log(rng, f"orphan{o}", 3) for o in range(k, min(k + 10 * BATCH_RUNS, n_orphans))], None))
    for i in range(0, n_runs, BATCH_RUNS):
        tasks.append(("runs", root, (i, min(i + BATCH_RUNS, n_runs), seed * 1_000_003 + i, now, template, pool), None))

    sizes: dict[str, int] = {}  # address -> stored bytes (for bytes_freed)
    referenced_by: dict[str, list[str]] = {}  # address -> categories of the runs that use it
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as procs:
        for task_sizes, refs in procs.imap_unordered(_task, tasks):
            for a, n in task_sizes.items():
                if a in sizes:
                    raise RuntimeError("benchmark blob content collided; every blob must be distinct")
                sizes[a] = n
            for cat, addresses in refs:
                for a in addresses:
                    referenced_by.setdefault(a, []).append(cat)

    eligible = {"old", "old_failed"}
    garbage = [a for a in sizes if a not in referenced_by or all(c in eligible for c in referenced_by[a])]
    return {
        "runs": n_runs,
        "blobs": len(sizes),
        "orphans": n_orphans,
        "runs_removable": sum(1 for j in range(n_runs) if _category(j) in eligible),
        "blobs_removable": len(garbage),
        "bytes_removable": sum(sizes[a] for a in garbage),
        "blobs_kept": len(sizes) - len(garbage),
        "build_s": time.perf_counter() - t0,
        "workers": workers,
    }


def _task(task: tuple) -> tuple[dict[str, int], list[tuple[str, list[str]]]]:
    """One build task in a worker: a batch of plain blobs, or a batch of runs with their blobs."""
    kind, root, payload, _ = task
    reg = Registry(root)
    store = DiskStore(os.path.join(root, "blobs"), packing=PACKED)
    sizes: dict[str, int] = {}

    def put(batch, data: bytes) -> str:
        info = batch.put_bytes(data)
        if info.existed:
            raise RuntimeError("benchmark blob content collided; every blob must be distinct")
        sizes[info.address] = info.stored_size
        return info.address

    if kind == "blobs":
        with store.batch() as b:
            for data in payload:
                put(b, data)
        return sizes, []
    start, end, seed, now, template, pool = payload
    rng = random.Random(seed)
    made = []
    with store.batch() as b:
        for j in range(start, end):
            tag = f"run{j}"
            logs = {}
            for stream, lines in (("stdout", 12), ("stderr", 3), ("transcript", 15)):
                data = _log(rng, f"{tag}-{stream}", lines)
                logs[stream] = {"blake3": put(b, data), "size": len(data)}
            entries = []
            for name, lines in (("reports/junit.xml", 4), ("coverage.json", 6), ("summary.txt", 1), ("logs/build.log", 10), ("bench/results.csv", 5)):
                data = _log(rng, f"{tag}-{name}", lines)
                entries.append(TreeEntry(name, "file", 0o644, len(data), put(b, data)))
            shared, shared_size = pool[rng.randrange(len(pool))]
            entries.append(TreeEntry("deps/requirements.lock", "file", 0o644, shared_size, shared))
            tree = Tree(sorted(entries, key=lambda e: e.path))
            tree_addr = put(b, tree.to_bytes())
            made.append((j, logs, tree_addr, tree))
    # the batch is synced: now the manifests that reference its blobs may be committed
    refs = []
    for j, logs, tree_addr, tree in made:
        cat = _category(j)
        m = _manifest(j, template, rng, now, cat, logs, tree_addr, tree)
        run, lock = runs.create(reg.runs_dir, m)
        lock.release()
        run.remove_workspace()
        # a gc saw it terminal a minute after it finished (retention holds a run until gc has)
        retention.write_sighting(run.path, parse_ts(m["finished_at"]) + 60, (None, None))
        refs.append((cat, [*(r["blake3"] for r in logs.values()), tree_addr, *tree.addresses()]))
    return sizes, refs


def build_in_child(root: str, n_runs: int, seed: int = 1) -> dict:
    """``build_registry`` in a forked child: the builder's bookkeeping (100,000s of addresses)
    must not raise this process' peak RSS, which Linux carries into every child's
    ``ru_maxrss`` and so into the peak RSS reported for the timed commands."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(build_registry(root, n_runs, seed))
        except BaseException as e:  # report, do not hang the parent
            send.send({"error": f"{type(e).__name__}: {e}"})

    proc = ctx.Process(target=child)
    proc.start()
    info = recv.recv()
    proc.join()
    if "error" in info:
        raise RuntimeError(f"building the registry failed: {info['error']}")
    return info


def _manifest(j: int, template: dict, rng: random.Random, now: float, cat: str, logs: dict, tree_addr: str, tree: Tree) -> dict:
    finished = now - (2 * 3600.0 if cat == "recent" else 30 * DAY) - rng.uniform(0, 3600)
    started = finished - rng.uniform(5, 900)
    created = started - rng.uniform(0.05, 3.0)
    m = copy.deepcopy(template)
    suite = rng.choice(SUITES)
    m["run_id"] = new_run_id(now=created)
    m["created_at"] = m["updated_at"] = format_ts(created)
    m["created_ns"] = int(created * 1e9)
    m["submitted_by"]["pid"] = 10000 + j % 50000
    m["labels"] = {"suite": suite, "branch": rng.choice(BRANCHES), "shard": str(j % 16)}
    m["request"]["argv"] = ["pytest", "-q", f"tests/{suite}", f"--shard={j % 16}/16"]
    m["supervisor"] = {"host": socket.gethostname(), "pid": 20000 + j % 40000, "start_time": 123456, "boot_id": locking.boot_id()}
    status = mf.FAILED if cat == "old_failed" else mf.SUCCEEDED
    mf.transition(m, mf.BOOTING, format_ts(started))
    m["deadline_at"] = format_ts(started + 1800)
    mf.transition(m, mf.RUNNING, format_ts(started + 0.2))
    m["process"] = {"pid": 20000 + j % 40000, "pgid": 20000 + j % 40000, "start_time": 123457, "boot_id": locking.boot_id()}
    mf.transition(m, mf.COLLECTING, format_ts(finished - 0.05))
    # what collect.finish writes
    m["logs"] = logs
    m["artifacts"] = {"tree": tree_addr, "files": tree.files, "bytes": tree.total_size}
    m["exit_code"] = 0 if status == mf.SUCCEEDED else 1
    if status == mf.FAILED:
        m["error"] = {"code": "command_failed", "message": "command exited with code 1"}
    m["heartbeat_at"] = format_ts(finished - 0.1)
    m["last_activity_at"] = format_ts(finished - 0.5)
    mf.transition(m, status, format_ts(finished))
    ret = m.setdefault("retention", {})
    if cat == "promoted":
        ret["promoted"] = True
        ret["history"] = [{"action": "promote", "at": format_ts(finished + 60), "reason": "baseline", "by": "bench"}]
    elif cat == "retain_for":
        ret["retain_for"] = 90 * DAY
    return m


# -- timing ---------------------------------------------------------------------------------------


def cli_step(root: str, *args: str) -> dict:
    wall, rss, code, out, err = timed([CASRUNS, "--root", root, *args])
    try:
        report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    except ValueError:
        report = {"unparsed": out[-500:]}
    if code not in (0, 14):
        print(f"    ! casruns {' '.join(args)} exited {code}: {err.strip()[-500:]}", flush=True)
    return {"wall": wall, "rss": rss, "code": code, "report": report}


def floor() -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def count_blobs(root: str) -> int:
    """Distinct blobs stored, loose or packed."""
    return sum(1 for _ in DiskStore(os.path.join(root, "blobs")).iter_addresses())


# -- profiling ------------------------------------------------------------------------------------


def profile_gc(n_runs: int) -> None:
    root = tempfile.mkdtemp(prefix="casruns-bench-gc-prof-", dir="/work")
    try:
        print(f"\nProfiling gc in-process on a fresh registry of {n_runs:,} runs / {n_runs * BLOBS_PER_RUN:,} blobs ...", flush=True)
        build_in_child(os.path.join(root, "reg"), n_runs, seed=3)
        for label in ("first gc (removes half)", "second gc (nothing to remove)"):
            reg = Registry(os.path.join(root, "reg"))
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            report = reg.gc()
            prof.disable()
            wall = time.perf_counter() - t0
            print(f"\n  {label}: {wall:.2f} s under cProfile (report duration_s {report['duration_s']})")
            for key in ("cumulative", "tottime"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(18)
                lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
                start = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
                print(f"  -- top by {key} --")
                for ln in lines[start : start + 19]:
                    print("   " + ln[:160])
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 and 2,000 runs instead of 5,000 and 10,000")
    ap.add_argument("--profile", action="store_true", help="cProfile gc in-process even if it meets its target")
    ap.add_argument("--packed", action="store_true", help="build with packs (250 runs per pack set) instead of loose blobs")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each read-only step (verify); the fastest is reported")
    args = ap.parse_args()
    global PACKED
    PACKED = args.packed
    sizes = [1000, 2000] if args.quick else [5000, 10000]

    print(f"casruns gc/verify benchmark; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"python -c pass (start-up floor): {floor() * 1e3:.1f} ms\n", flush=True)
    base = tempfile.mkdtemp(prefix="casruns-bench-gc-", dir="/work")
    results: dict[int, dict] = {}
    try:
        for n in sizes:
            root = os.path.join(base, f"reg-{n}")
            print(f"== {n:,} runs / {n * BLOBS_PER_RUN:,} blobs ==", flush=True)
            info = build_in_child(root, n)
            on_disk = count_blobs(root)
            t_sync = time.perf_counter()
            os.sync()
            t_sync = time.perf_counter() - t_sync
            print(
                f"  built in {info['build_s']:.1f} s ({info['workers']} worker processes): "
                f"{info['runs']:,} runs, {on_disk:,} blobs on disk ({info['orphans']:,} orphans); "
                f"gc must remove {info['runs_removable']:,} runs, {info['blobs_removable']:,} blobs, "
                f"{info['bytes_removable']:,} bytes; sync after build {t_sync:.1f} s (untimed)",
                flush=True,
            )
            r = {"info": info}
            steps = [
                ("verify", ("verify", "--json")),
                ("verify_read", ("verify", "--read-data", "--json")),
                ("gc", ("gc", "--json")),
                ("gc2", ("gc", "--json")),
                ("verify_after", ("verify", "--json")),
            ]
            for name, argv in steps:
                # untimed: flush what earlier steps (and other processes) left dirty, so no
                # step pays for another's writeback
                os.sync()
                reps = args.repeat if name in ("verify", "verify_read") else 1  # read-only steps
                tries = [cli_step(root, *argv) for _ in range(reps)]
                r[name] = step = min(tries, key=lambda t: t["wall"])
                rep = step["report"]
                if name.startswith("verify"):
                    extra = (f"runs_checked {rep.get('runs_checked')}, blobs_checked {rep.get('blobs_checked')}, "
                             f"orphans {rep.get('orphans')}, problems {len(rep.get('problems', []))}, ok {rep.get('ok')}")
                else:
                    extra = ", ".join(f"{k} {rep.get(k)}" for k in ("runs_removed", "blobs_removed", "bytes_freed", "blobs_kept",
                                                                   "pins_removed", "temps_removed", "duration_s"))
                walls = ", ".join(f"{t['wall']:.2f}" for t in tries)
                all_t = f" (fastest of {walls})" if reps > 1 else ""
                print(f"  {' '.join(argv):<26} {step['wall']:7.2f} s  peak RSS {step['rss']:6.1f} MiB  exit {step['code']}  ({extra}){all_t}", flush=True)
            # correctness of the gc report against what the builder knows
            g, g2, va = r["gc"]["report"], r["gc2"]["report"], r["verify_after"]["report"]
            checks = [
                ("runs_removed", g.get("runs_removed"), info["runs_removable"]),
                ("blobs_removed", g.get("blobs_removed"), info["blobs_removable"]),
                *([] if PACKED else [("bytes_freed", g.get("bytes_freed"), info["bytes_removable"])]),  # packs free whole files
                ("blobs_kept", g.get("blobs_kept"), info["blobs_kept"]),
                ("second gc runs_removed", g2.get("runs_removed"), 0),
                ("second gc blobs_removed", g2.get("blobs_removed"), 0),
                ("blobs on disk after gc", count_blobs(root), info["blobs_kept"]),
                ("verify after gc ok", va.get("ok"), True),
                ("verify after gc orphans", va.get("orphans"), 0),
                ("verify before gc ok", r["verify"]["report"].get("ok"), True),
                ("verify --read-data ok", r["verify_read"]["report"].get("ok"), True),
            ]
            bad = [(k, got, want) for k, got, want in checks if got != want]
            print("  report checks: " + ("all as expected" if not bad else "; ".join(f"{k}: got {got}, expected {want}" for k, got, want in bad)))
            results[n] = r
            shutil.rmtree(root, ignore_errors=True)
            print(flush=True)

        small, large = sizes
        print("== summary ==")
        print(f"  {'step':<26} {'small':>9} {'large':>9} {'large/small':>12}   {'(runs+blobs)/s small':>21} {'large':>9}")
        for name, label in (("gc", "gc (removes half)"), ("gc2", "gc again (nothing to do)"), ("verify", "verify"),
                            ("verify_read", "verify --read-data"), ("verify_after", "verify after gc")):
            ts, tl = results[small][name]["wall"], results[large][name]["wall"]
            if name in ("gc2", "verify_after"):
                # these see what gc left
                us = results[small]["info"]["runs"] - results[small]["info"]["runs_removable"] + results[small]["info"]["blobs_kept"]
                ul = results[large]["info"]["runs"] - results[large]["info"]["runs_removable"] + results[large]["info"]["blobs_kept"]
            else:
                us = results[small]["info"]["runs"] + results[small]["info"]["blobs"]
                ul = results[large]["info"]["runs"] + results[large]["info"]["blobs"]
            print(f"  {label:<26} {ts:8.2f}s {tl:8.2f}s {tl / ts:11.2f}x   {us / ts:21,.0f} {ul / tl:9,.0f}")
        gl = results[large]["gc"]["wall"]
        scaled = gl * TARGET_RUNS / large
        verdict = "meets" if scaled < GC_TARGET_S else "MISSES"
        print(f"\n  target: gc of {TARGET_RUNS:,} runs / {TARGET_RUNS * BLOBS_PER_RUN:,} blobs under {GC_TARGET_S:.0f} s on this 2-core machine")
        if large == TARGET_RUNS:
            print(f"  measured {gl:.2f} s -> {verdict}")
        else:
            print(f"  measured {gl:.2f} s at {large:,} runs; linear estimate at {TARGET_RUNS:,}: {scaled:.1f} s -> {verdict} (estimate; run without --quick)")
        print("  linear growth gives a large/small ratio of ~2x")
        import resource

        print(f"  peak RSS of this process (a floor under the RSS figures above): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
        print(f"  load average at the end: {os.getloadavg()[0]:.2f} (2 CPUs: above ~1.5 the figures are noisy)")
        if verdict == "MISSES" or args.profile:
            profile_gc(small)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
