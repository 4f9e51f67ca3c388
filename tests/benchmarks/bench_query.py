"""Benchmark of the query path: ``casruns status`` and ``casruns list`` as orchestrators call them.

Run on demand (it is not a pytest test, and it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_query.py            # 1,000 and 10,000 runs
    .venv/bin/python tests/benchmarks/bench_query.py --quick    # 200 and 2,000 runs

What it does
------------
1. **Builds registries** of finished runs under ``tempfile.mkdtemp(dir="/work")`` without
   spawning any supervisor. A few *seed* runs go through the real lifecycle in-process:
   ``Registry.submit(spawn=False)``, the status walked through the transition table,
   spool logs and artifact files written into the run's workspace, then
   ``collect.finish`` with the registry's blob store (so logs, the artifact tree and its
   files are real blobs). Every other run copies a seed's shape: its queued manifest gets
   its own id, times, labels and argv, is walked queued -> booting -> running ->
   collecting -> terminal with ``manifest.transition``, receives the seed's terminal fields
   (log and artifact refs, exit code, error, ...) and is written with ``runs.create``
   (atomic, durable, with its JSON read cache), then its empty workspace is removed, as
   ``collect.finish`` does. Refs are shared between runs; the blobs exist. Generation
   time is printed. An empty registry is built too: it gives the fixed cost of ``list``.

2. **Times the real CLI** (``.venv/bin/casruns``) as a fresh subprocess per call, like
   an orchestrator poll, with hyperfine (``-N``: no shell; installed with apt-get if
   missing) or, failing that, a ``subprocess.run`` loop. Output goes to /dev/null.
   Measured: ``status RUN_ID --json`` on each size (40 runs: median, p90), the same
   with ``CASRUNS_NO_FASTPATH=1`` (the click CLI), ``list --json`` on each size and on
   the empty registry (8 runs), and the floors ``python -c pass``, ``python -c "import
   click"`` and ``python -c "import casruns.registry"`` (what the query path must import)
   with the same interpreter. Commands are interleaved in 4 rounds so that load from
   other processes spreads over all of them. The page cache is warm (warm-up runs
   first): this is the steady polling case, not a cold start.

3. **Prints the targets beside the figures**: status median <= 60 ms and <= 1.35x
   ``import click``; list of 10,000 runs < 1 s; list cost linear or better (ratio of the
   list time at the two sizes, and microseconds per run above the empty-registry cost).
   Verdicts say "meets" or "MISSES"; nothing fails on a slow machine.

4. **Prints what the status path imports**: the 10 most expensive cumulative imports of
   ``python -X importtime -m casruns status ID --json``.

5. **Explains list**: an in-process split of ``Registry(root).list()`` (also with the
   cyclic garbage collector disabled, to show its share) and JSON rendering, and, when
   list misses its target (or with ``--profile``), a cProfile of ``Registry(root).list()``
   on the largest registry.

6. **Status under a keep-last retention rule** (``[retention.keep_last] suite = 5``), which
   must know the newer runs carrying the same label value: the status path stays per-run
   only if that does not mean reading every manifest.

The registries are deleted at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from casruns import Registry
from casruns import collect, locking, runs, scheduler
from casruns import manifest as mf
from casruns.ids import new_run_id
from casruns.timefmt import format_ts, now_ts

PY = sys.executable
CASRUNS = os.path.join(os.path.dirname(PY), "casruns")

# Targets (printed, never asserted).
STATUS_MAX_MS = 60.0
STATUS_MAX_VS_CLICK = 1.35
LIST_10K_MAX_S = 1.0
ROUNDS = 4  # measurements are interleaved in this many rounds
LINEAR_SLACK = 1.15  # per-run cost at the big size may exceed the small size's by 15% (noise)


# -- building registries ------------------------------------------------------------------

# Seed runs: (status, share of the bulk runs, exit code, signal, error).
SEEDS = [
    (mf.SUCCEEDED, 0.75, 0, None, None),
    (mf.FAILED, 0.15, 1, None, {"code": "command_failed", "message": "command exited with code 1"}),
    (mf.TIMED_OUT, 0.05, None, 9, {"code": "timeout", "message": "the run exceeded its timeout"}),
    (mf.CANCELLED, 0.05, None, 15, None),
]
SUITES = ["unit", "integration", "e2e", "lint"]
BRANCHES = ["main", "release-1.4", "feature/manifest-cache", "renovate/zstandard"]
TRIGGERS = ["push", "schedule", "manual"]
TERMINAL_FIELDS = ("logs", "artifacts", "exit_code", "signal", "error", "process", "supervisor")


def _seed_run(reg: Registry, rng: random.Random, status: str, exit_code, signal, error) -> tuple[dict, dict]:
    """One run through the real in-process lifecycle. Returns (queued manifest, final manifest)."""
    suite = rng.choice(SUITES)
    rec = reg.submit(
        ["pytest", "-q", f"tests/{suite}"],
        labels={"suite": suite, "branch": "main", "seed": status},
        timeout="30m",
        spawn=False,
    )
    rid = rec["run_id"]
    run = reg.run_dir(rid)
    queued = copy.deepcopy(run.read_fresh())
    with run.update() as m:  # what the supervisor records when it takes the run
        m["supervisor"] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": locking.process_start_time(os.getpid()),
            "boot_id": locking.boot_id(),
        }
    scheduler.dequeue(reg.root, rid)
    with run.update() as m:
        now = time.time()
        mf.transition(m, mf.BOOTING, format_ts(now))
        m["deadline_at"] = format_ts(now + 1800)
    with run.update() as m:
        mf.transition(m, mf.RUNNING, now_ts())
        m["process"] = {"pid": 4242, "pgid": 4242, "start_time": 123456, "boot_id": locking.boot_id()}
    # What the command printed and left behind: a few small, real blobs.
    out_lines = [f"tests/{suite}/test_{i:03d}.py::test_case PASSED" for i in range(40)]
    err_lines = [f"warning: {status} run, line {i}" for i in range(5)]
    for name, lines in (("stdout", out_lines), ("stderr", err_lines)):
        with open(run.spool(name), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(run.spool("transcript"), "w") as f:
        f.writelines(f"{now_ts()} stdout {line}\n" for line in out_lines)
    os.makedirs(os.path.join(run.artifacts_dir, "reports"))
    with open(os.path.join(run.artifacts_dir, "reports", "junit.xml"), "w") as f:
        f.write(f'<testsuite name="{suite}" tests="40" failures="{int(status != mf.SUCCEEDED)}"/>\n')
    with open(os.path.join(run.artifacts_dir, "coverage.json"), "w") as f:
        json.dump({"suite": suite, "percent": 87.5, "files": {f"m{i}.py": i for i in range(20)}}, f)
    with open(run.artifacts_dir + "/summary.txt", "w") as f:
        f.write(f"{status}\n")
    if status == mf.CANCELLED:
        with run.update() as m:
            m["cancel"] = {"requested_at": now_ts(), "reason": "cancelled by user"}
    final = collect.finish(run, reg.store, status, exit_code=exit_code, signal=signal, error=error)
    assert final["status"] == status, final["status"]
    return queued, copy.deepcopy(final)


def _bulk_manifest(i: int, t: float, rng: random.Random, queued: dict, final: dict) -> dict:
    """Run ``i`` created at ``t``: the seed's queued manifest, walked to the seed's end."""
    suite, branch, shard = rng.choice(SUITES), rng.choice(BRANCHES), i % 16
    m = copy.deepcopy(queued)
    m["run_id"] = new_run_id(now=t)
    m["created_at"] = m["updated_at"] = format_ts(t)
    m["created_ns"] = int(t * 1e9)
    m["submitted_by"]["pid"] = 10000 + i % 50000
    m["labels"] = {
        "suite": suite,
        "branch": branch,
        "shard": str(shard),
        "ci.pipeline": str(70000 + i // 16),
        "triggered-by": rng.choice(TRIGGERS),
    }
    req = m["request"]
    req["argv"] = ["pytest", "-q", f"tests/{suite}", f"--shard={shard}/16", "--junitxml=$CASRUNS_ARTIFACTS_DIR/reports/junit.xml"]
    req["hash"] = hashlib.sha256(json.dumps([req["argv"], m["labels"]], sort_keys=True).encode()).hexdigest()
    for k in TERMINAL_FIELDS:
        if k in final:
            m[k] = copy.deepcopy(final[k])
    m["supervisor"]["pid"] = m["process"]["pid"] = m["process"]["pgid"] = 20000 + i % 40000
    started = t + rng.uniform(0.05, 3.0)
    ended = started + rng.uniform(2.0, 900.0)
    for status, at in (
        (mf.BOOTING, started),
        (mf.RUNNING, started + 0.2),
        (mf.COLLECTING, ended),
        (final["status"], ended + 0.05),
    ):
        mf.transition(m, status, format_ts(at))
    m["deadline_at"] = format_ts(started + 1800)
    m["heartbeat_at"] = format_ts(ended)
    m["last_activity_at"] = format_ts(ended - 0.5)
    if "cancel" in final:
        m["cancel"] = {"requested_at": format_ts(ended - 1), "reason": final["cancel"]["reason"]}
    return m


def build_registry(root: str, n: int, seed: int = 1) -> tuple[float, list[str]]:
    """Create a registry with ``n`` finished runs. Returns (seconds, ids of bulk runs)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    reg = Registry(root)
    reg.init()
    if n == 0:
        return time.perf_counter() - t0, []
    seeds = [(_seed_run(reg, rng, st, code, sig, err), share) for st, share, code, sig, err in SEEDS]
    templates = [tq for tq, _ in seeds]
    weights = [share for _, share in seeds]
    ids = []
    start = time.time() - (n - len(SEEDS)) * 30.0  # one run every 30 s up to now
    for i in range(n - len(SEEDS)):
        queued, final = rng.choices(templates, weights)[0]
        m = _bulk_manifest(i, start + i * 30.0 + rng.uniform(0, 20), rng, queued, final)
        run, lock = runs.create(reg.runs_dir, m)
        lock.release()
        run.remove_workspace()
        ids.append(run.run_id)
    return time.perf_counter() - t0, ids


def check_caches(root: str, sample: list[str]) -> int:
    """How many of ``sample`` have a manifest.json cache whose tag matches manifest.toml."""
    ok = 0
    for rid in sample:
        d = os.path.join(root, "runs", rid)
        st = os.stat(os.path.join(d, "manifest.toml"))
        with open(os.path.join(d, "manifest.json"), "rb") as f:
            tag = json.load(f).get("tag")
        ok += tag == [st.st_ino, st.st_size, st.st_mtime_ns]
    return ok


# -- timing subprocesses ------------------------------------------------------------------

def ensure_hyperfine() -> str | None:
    path = shutil.which("hyperfine")
    if path:
        return path
    print("hyperfine not found: apt-get install -y hyperfine ...", flush=True)
    try:
        p = subprocess.run(["apt-get", "install", "-y", "hyperfine"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"  could not run apt-get ({e}); using a subprocess loop instead")
        return None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:]
        print(f"  apt-get failed ({' '.join(tail)}); using a subprocess loop instead")
        return None
    return shutil.which("hyperfine")


class Timer:
    """Wall times of a command run as a fresh process, with hyperfine or a plain loop."""

    def __init__(self, hyperfine: str | None) -> None:
        self.hyperfine = hyperfine
        self.name = f"hyperfine -N ({hyperfine})" if hyperfine else "subprocess.run loop (perf_counter)"

    def times(self, argv: list[str], runs: int, *, warmup: int = 3, env: dict | None = None) -> list[float]:
        env = dict(os.environ if env is None else env)
        if self.hyperfine:
            return self._hyperfine(argv, runs, warmup, env)
        return self._loop(argv, runs, warmup, env)

    def _hyperfine(self, argv, runs, warmup, env) -> list[float]:
        fd, out = tempfile.mkstemp(suffix=".json", dir="/work")
        os.close(fd)
        try:
            cmd = [self.hyperfine, "-N", "--style", "none", "--warmup", str(warmup), "--runs", str(runs),
                   "--export-json", out, shlex.join(argv)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"hyperfine failed on {shlex.join(argv)}:\n{p.stderr}")
            with open(out) as f:
                return json.load(f)["results"][0]["times"]
        finally:
            os.unlink(out)

    @staticmethod
    def _loop(argv, runs, warmup, env) -> list[float]:
        out = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
        return out


def measure_interleaved(timer: Timer, commands: dict) -> dict[str, dict]:
    """Time each command (name -> (argv, env, runs)) over ROUNDS rounds, one block per
    command per round, so a burst of outside load does not land on one command only."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(ROUNDS):
        for name, (argv, env, runs) in commands.items():
            times[name] += timer.times(argv, runs // ROUNDS, warmup=2 if r == 0 else 1, env=env)
    return {name: summary(ts) for name, ts in times.items()}


def summary(times: list[float]) -> dict:
    xs = sorted(times)
    p90 = xs[min(len(xs) - 1, max(0, -(-9 * len(xs) // 10) - 1))]  # nearest rank
    return {"n": len(xs), "median": statistics.median(xs), "p90": p90, "min": xs[0], "max": xs[-1]}


def fmt_row(name: str, s: dict) -> str:
    return (f"  {name:<44} n={s['n']:<3} median {s['median'] * 1e3:8.1f} ms   p90 {s['p90'] * 1e3:8.1f} ms"
            f"   min {s['min'] * 1e3:8.1f} ms")


def load_note() -> str:
    load = os.getloadavg()
    text = " ".join(f"{x:.2f}" for x in load)
    if load[0] > 0.5 * (os.cpu_count() or 1):
        text += "  (busy machine: other processes inflate medians and p90; the min column is steadier)"
    return text


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


# -- what status imports ------------------------------------------------------------------

def top_imports(root: str, run_id: str, k: int = 10) -> tuple[list[tuple[int, int, str]], int, set[str]]:
    """(cumulative us, self us, module) of the ``k`` most expensive imports, the number of
    modules imported, and which of the known-heavy modules were among them."""
    argv = [PY, "-X", "importtime", "-m", "casruns", "--root", root, "status", run_id, "--json"]
    subprocess.run(argv, capture_output=True)  # once to settle .pyc files
    p = subprocess.run(argv, capture_output=True, text=True, check=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        rows.append((int(cum_us), int(self_us), name.rstrip()))
    names = {r[2].strip() for r in rows}
    heavy = {m for m in ("click", "zstandard", "blake3", "tomli_w", "pluggy", "casruns.store", "casruns.supervisor") if m in names}
    return sorted(rows, reverse=True)[:k], len(rows), heavy


# -- list, in process -----------------------------------------------------------------------

def list_in_process(root: str, repeat: int = 3) -> dict:
    """Best-of-``repeat`` seconds of ``Registry(root).list()`` (with the cyclic garbage
    collector on, as the CLI runs it, and off, to show its share) and of the JSON rendering."""
    from casruns.cli.render import dump_json

    def best(fn, gc_on: bool = True) -> tuple[float, object]:
        times, result = [], None
        for _ in range(repeat):
            result = None  # the previous result would enlarge the heap the collector walks
            gc.collect()
            if not gc_on:
                gc.disable()
            try:
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
            finally:
                gc.enable()
        return min(times), result

    t_list, records = best(lambda: Registry(root).list())
    t_nogc, _ = best(lambda: Registry(root).list(), gc_on=False)
    t_dump, text = best(lambda: dump_json({"schema": "casruns/list/v1", "runs": records}))
    return {"list": t_list, "list_nogc": t_nogc, "dump": t_dump, "count": len(records), "bytes": len(text)}


def profile_list(root: str, lines: int = 18) -> None:
    prof = cProfile.Profile()
    prof.enable()
    Registry(root).list()
    prof.disable()
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(lines)
        text = buf.getvalue()
        print(f"\n  cProfile of Registry(root).list(), sorted by {key}:")
        print("\n".join("    " + ln for ln in text[text.find("   ncalls"):].rstrip().splitlines()))


# -- main -----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 and 2,000 runs instead of 1,000 and 10,000")
    ap.add_argument("--timer", choices=("auto", "loop"), default="auto", help="auto: hyperfine if available (installed if missing)")
    ap.add_argument("--profile", action="store_true", help="cProfile list even if it meets its target")
    args = ap.parse_args()

    sizes = (200, 2000) if args.quick else (1000, 10000)
    status_runs, list_runs = 40, 8  # per command, over ROUNDS rounds
    if not os.path.exists(CASRUNS):
        print(f"no casruns command next to {PY}", file=sys.stderr)
        return 2
    timer = Timer(ensure_hyperfine() if args.timer == "auto" else None)
    env_fast = {k: v for k, v in os.environ.items() if k != "CASRUNS_NO_FASTPATH"}
    env_click = dict(env_fast, CASRUNS_NO_FASTPATH="1")

    base = tempfile.mkdtemp(prefix="casruns-bench-", dir="/work")
    try:
        print(f"casruns query benchmark: python {sys.version.split()[0]} ({PY}), {os.cpu_count()} CPUs")
        print(f"timer: {timer.name}; registries under {base}")
        print(f"load average at start: {load_note()}\n")

        # 1. registries
        print("1. building registries (no supervisors)")
        roots, sample_id = {}, {}
        for n in (0, *sizes):
            root = os.path.join(base, f"reg-{n}")
            secs, ids = build_registry(root, n, seed=n)
            roots[n] = root
            if ids:
                sample_id[n] = ids[len(ids) // 2]
                sample = ids[:: max(1, len(ids) // 200)]
                cached = check_caches(root, sample)
                print(f"  {n:>6} runs in {secs:6.2f} s ({secs / n * 1e6:6.0f} us/run); "
                      f"manifest cache valid for {cached}/{len(sample)} sampled runs")
            else:
                print(f"  {n:>6} runs in {secs:6.2f} s (empty registry: the fixed cost of list)")
        small, big = sizes
        rid = sample_id[big]

        # sanity: the commands work and the two status paths agree
        fast_out = subprocess.run([CASRUNS, "--root", roots[big], "status", rid, "--json"], env=env_fast,
                                  capture_output=True, check=True).stdout
        click_out = subprocess.run([CASRUNS, "--root", roots[big], "status", rid, "--json"], env=env_click,
                                   capture_output=True, check=True).stdout
        listed = json.loads(subprocess.run([CASRUNS, "--root", roots[small], "list", "--json"], env=env_fast,
                                           capture_output=True, check=True).stdout)
        print(f"  status {rid}: {json.loads(fast_out)['status']}; fast path and click output identical: "
              f"{fast_out == click_out}; list --json on {small}: {len(listed['runs'])} runs")

        # 2. timings, interleaved in rounds so that load from other processes hits all alike
        print(f"\n2. wall time of fresh processes (warm page cache; {ROUNDS} interleaved rounds)")

        def status(n: int, env: dict) -> tuple:
            return [CASRUNS, "--root", roots[n], "status", sample_id[n], "--json"], env, status_runs

        def listing(n: int) -> tuple:
            return [CASRUNS, "--root", roots[n], "list", "--json"], env_fast, list_runs

        # key -> (label, (argv, env, runs))
        commands = {
            "pass": ("python -c pass", ([PY, "-c", "pass"], env_fast, status_runs)),
            "click": ('python -c "import click"', ([PY, "-c", "import click"], env_fast, status_runs)),
            "registry": ('python -c "import casruns.registry"', ([PY, "-c", "import casruns.registry"], env_fast, status_runs)),
            **{f"status{n}": (f"casruns status ID --json ({n} runs)", status(n, env_fast)) for n in sizes},
            "status_click": (f"  same, CASRUNS_NO_FASTPATH=1 ({big} runs)", status(big, env_click)),
            **{f"list{n}": (f"casruns list --json ({n} runs)", listing(n)) for n in (0, *sizes)},
        }
        res = measure_interleaved(timer, {key: spec for key, (_, spec) in commands.items()})
        for key, (label, _) in commands.items():
            print(fmt_row(label, res[key]))

        # 3. targets
        st = res[f"status{big}"]["median"]
        click = res["click"]["median"]
        floor = res["pass"]["median"]
        saved = res["status_click"]["median"] - st
        t0, ts, tb = (res[f"list{n}"]["median"] for n in (0, small, big))
        per_small, per_big = (ts - t0) / small, (tb - t0) / big
        list_big_target = LIST_10K_MAX_S * big / 10000
        print("\n3. targets")
        print(f"  status median {st * 1e3:.1f} ms <= {STATUS_MAX_MS:.0f} ms: {verdict(st * 1e3 <= STATUS_MAX_MS)}")
        print(f"  status median / import-click median = {st / click:.2f}x <= {STATUS_MAX_VS_CLICK}x: "
              f"{verdict(st <= STATUS_MAX_VS_CLICK * click)}   (above python -c pass: {(st - floor) * 1e3:+.1f} ms; "
              f"import casruns.registry alone: {res['registry']['median'] * 1e3:.1f} ms)")
        print(f"  fast path saves {saved * 1e3:.1f} ms per status call "
              f"({res['status_click']['median'] * 1e3:.1f} -> {st * 1e3:.1f} ms)")
        print(f"  list of {big} runs {tb:.3f} s < {list_big_target:.2f} s"
              f"{'' if big == 10000 else ' (1 s scaled to this size)'}: {verdict(tb < list_big_target)}")
        print(f"  list time ratio {big}/{small} runs = {tb / ts:.2f} (sizes ratio {big / small:.0f})")
        print(f"  per run above the empty registry ({t0 * 1e3:.1f} ms): {per_small * 1e6:.1f} us at {small}, "
              f"{per_big * 1e6:.1f} us at {big}: linear or better: {verdict(per_big <= per_small * LINEAR_SLACK)}")

        # 4. imports of the status path
        top, count, heavy = top_imports(roots[big], rid)
        print(f"\n4. python -X importtime -m casruns status ID --json: {count} modules imported; "
              f"heavy ones present: {', '.join(sorted(heavy)) or 'none'}")
        print("  cumulative us    self us  module")
        for cum, self_us, name in top:
            print(f"  {cum:>13} {self_us:>10}  {name}")

        # 5. list, in process
        print("\n5. list in process (best of 3)")
        per_run = {}
        for n in sizes:
            r = list_in_process(roots[n])
            per_run[n] = (r["list"] + r["dump"]) / n
            print(f"  {n:>6} runs: Registry.list() {r['list'] * 1e3:7.1f} ms ({r['list'] / n * 1e6:5.1f} us/run; "
                  f"gc disabled: {r['list_nogc'] / n * 1e6:5.1f} us/run), "
                  f"JSON render {r['dump'] * 1e3:6.1f} ms ({r['dump'] / n * 1e6:5.1f} us/run), "
                  f"{r['count']} records, {r['bytes'] / 1e6:.1f} MB")
        print(f"  list + render per run: {per_run[small] * 1e6:.1f} us at {small}, {per_run[big] * 1e6:.1f} us at {big}: "
              f"linear or better: {verdict(per_run[big] <= per_run[small] * LINEAR_SLACK)}")
        if args.profile or tb >= list_big_target:
            profile_list(roots[big])

        # 6. status under a keep-last rule, which needs to know the newer runs of the label
        print(f"\n6. status with [retention.keep_last] suite = 5 in config.toml ({big} runs)")
        with open(os.path.join(roots[big], "config.toml"), "w") as f:
            f.write("[retention.keep_last]\nsuite = 5\n")
        kept = summary(timer.times(status(big, env_fast)[0], 12, warmup=1, env=env_fast))
        os.unlink(os.path.join(roots[big], "config.toml"))
        print(fmt_row(f"casruns status ID --json ({big} runs)", kept))
        print(f"  vs {st * 1e3:.1f} ms without the rule: {verdict(kept['median'] * 1e3 <= STATUS_MAX_MS)} the 60 ms target")

        print(f"\nload average at end: {load_note()}")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
