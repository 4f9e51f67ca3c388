"""Benchmarks of the event journal (spec/events.md); run on demand, prints figures beside floors.

    .venv/bin/python tests/benchmarks/bench_events.py [--quick]

1. Latency from a change to a `casruns events --follow --json` consumer reading it: 1,000 status
   changes over 200 runs (all 200 active meanwhile), made by a driver process one every few ms.
   Latency = the consumer's arrival time minus the event's `time` (taken when the change was made,
   before its commit), so it includes the commit itself. Floor: the same follower with
   CASRUNS_NOTIFY=poll (the fallback), and the commit's own cost.
2. CPU of an idle follower over a period (10 s --quick, 600 s full) against polling `status` for
   200 runs every 2 s (measured for one round, scaled to the period).
3. Journal overhead: 1,000 manifest updates (promote/unpromote) and a burst of 200 real submits,
   this tree against the commit before events (a git worktree of e8fed21, same machine, same run).
4. `events --from-start --json` over 1,000,000 events (100,000 with --quick): events/s and peak RSS;
   floor: `cat` of the segments to /dev/null... and `python -c pass`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from _timing import timed  # noqa: E402

PY = sys.executable
BEFORE_EVENTS = "e8fed21"

DRIVER = r"""
import sys, time
from casruns import Registry
from casruns import manifest as mf
from casruns.timefmt import now_ts
reg = Registry(sys.argv[1]); n = int(sys.argv[2]); gap = float(sys.argv[3])
ids = [reg.submit(["true"], spawn=False, labels={"bench": "latency"})["run_id"] for _ in range(n)]
time.sleep(0.5)
path = ["booting", "running", "collecting_artifacts", "succeeded"]
for step in path:                      # every run moves one step per round: all 200 stay active
    for rid in ids:
        with reg.run_dir(rid).update() as m:
            mf.transition(m, step, now_ts())
        time.sleep(gap)
"""


def parse_ts(s: str) -> float:
    from casruns.timefmt import parse_ts as p

    return p(s)


def new_registry(prefix: str, notify: str) -> tuple[str, dict]:
    """An initialized throw-away registry and the environment that selects it (and the notify kind)."""
    root = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ, CASRUNS_HOME=root)
    if notify == "poll":
        env["CASRUNS_NOTIFY"] = "poll"
    subprocess.run([PY, "-m", "casruns", "init"], env=env, check=True, capture_output=True)
    return root, env


def latency(runs: int, notify: str) -> dict:
    root, env = new_registry("casruns-bench-events-", notify)
    follower = subprocess.Popen([PY, "-m", "casruns", "events", "--follow", "--json"], env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    arrivals: list[tuple[float, dict]] = []
    expected = runs * 5

    def read():
        for line in follower.stdout:
            arrivals.append((time.time(), json.loads(line)))
            if len(arrivals) >= expected:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    time.sleep(1.0)
    subprocess.run([PY, "-c", DRIVER, root, str(runs), "0.004"], env=env, check=True)
    t.join(timeout=60)
    follower.kill()
    follower.wait()
    shutil.rmtree(root, ignore_errors=True)
    lat = sorted((arr - parse_ts(e["time"])) * 1000 for arr, e in arrivals if e["type"] == "status")
    return {"n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99) - 1], "max": lat[-1], "received": len(arrivals), "expected": expected}


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(seconds: float, notify: str) -> float:
    root, env = new_registry("casruns-bench-idle-", notify)
    p = subprocess.Popen([PY, "-m", "casruns", "events", "--follow"], env=env, stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    start = cpu_of(p.pid)
    time.sleep(seconds)
    used = cpu_of(p.pid) - start
    p.kill()
    p.wait()
    shutil.rmtree(root, ignore_errors=True)
    return used


def polling_cpu(runs: int) -> float:
    """CPU of one round of `casruns status RUN_ID` for each of `runs` runs (separate processes)."""
    root = tempfile.mkdtemp(prefix="casruns-bench-poll-")
    env = dict(os.environ, CASRUNS_HOME=root)
    sys.path.insert(0, REPO)
    from casruns import Registry

    reg = Registry(root)
    ids = [reg.submit(["true"], spawn=False)["run_id"] for _ in range(runs)]
    before = os.times()
    for rid in ids:
        subprocess.run([PY, "-m", "casruns", "status", rid], env=env, stdout=subprocess.DEVNULL, check=True)
    after = os.times()
    shutil.rmtree(root, ignore_errors=True)
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


UPDATES = r"""
import sys, time
from casruns import Registry
reg = Registry(sys.argv[1]); n = int(sys.argv[2])
rid = reg.submit(["true"], spawn=False)["run_id"]
reg.cancel(rid)
t = time.perf_counter()
for i in range(n // 2):
    reg.promote(rid, reason="b"); reg.unpromote(rid, reason="b")
print(time.perf_counter() - t)
"""


def overhead(tree: str, updates: int, burst: int) -> tuple[float, float]:
    root = tempfile.mkdtemp(prefix="casruns-bench-overhead-")
    env = dict(os.environ, CASRUNS_HOME=root, PYTHONPATH=tree)
    out = subprocess.run([PY, "-c", UPDATES, root, str(updates)], env=env, check=True, capture_output=True, text=True).stdout
    per_update = float(out) / updates * 1000
    shutil.rmtree(root, ignore_errors=True)
    root = tempfile.mkdtemp(prefix="casruns-bench-burst-")
    env["CASRUNS_HOME"] = root
    subprocess.run([PY, "-m", "casruns", "init"], env=env, check=True, capture_output=True)
    with open(os.path.join(root, "config.toml"), "w") as f:
        f.write("max_running = 200\n")
    t = time.perf_counter()
    ids = []
    procs = [subprocess.Popen([PY, "-m", "casruns", "submit", "--json", "--", "true"], env=env, stdout=subprocess.PIPE, text=True) for _ in range(burst)]
    for p in procs:
        ids.append(json.loads(p.communicate()[0])["run_id"])
    subprocess.run([PY, "-m", "casruns", "wait", "--timeout", "300", *ids], env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    shutil.rmtree(root, ignore_errors=True)
    return per_update, wall


def many_events(n: int) -> tuple[float, float, float, float]:
    from casruns import events as ev
    from casruns.journal import Journal, encode_line

    root = tempfile.mkdtemp(prefix="casruns-bench-million-")
    subprocess.run([PY, "-m", "casruns", "--root", root, "init"], check=True, capture_output=True)
    j = Journal(os.path.join(root, "events"))
    m = {"run_id": "01BENCH", "status": "running", "labels": {"suite": "unit"}, "provider": "shell", "attempt": 1,
         "created_at": "2026-11-30T10:00:00.000000Z", "incarnation": "0" * 16}
    batch = []
    for i in range(n):
        e = ev._event(m, "status", "2026-11-30T10:00:00.000000Z", old_status="booting")
        e["seq"] = i + 1
        batch.append(encode_line(e))
        if len(batch) == 10000:
            j.append(batch)
            batch = []
    if batch:
        j.append(batch)
    size = sum(os.path.getsize(j.segment_path(s)) for s in j.segments())
    wall, rss, code, out, err = timed([PY, "-m", "casruns", "--root", root, "events", "--from-start", "--json"])
    assert code == 0, err
    lines = out.count("\n")
    floor, _, _, _, _ = timed(["cat", *[j.segment_path(s) for s in j.segments()]])
    shutil.rmtree(root, ignore_errors=True)
    return lines / wall, rss, size / wall / 1e6, floor


def main() -> int:
    quick = "--quick" in sys.argv
    print(f"bench_events ({'quick' if quick else 'full'}); {os.cpu_count()} cores; figures drift ~2x between runs on this machine")
    start_floor = statistics.median(timed([PY, "-c", "pass"])[0] for _ in range(3))
    print(f"floor: python -c pass {start_floor * 1000:.1f} ms")

    print("\n1. change -> follower latency, 200 runs active, 1,000 status changes (800 here + 200 created)")
    for notify in ("inotify", "poll"):
        r = latency(200, notify)
        print(f"   {notify:8s}: p50 {r['p50']:.1f} ms  p99 {r['p99']:.1f} ms  max {r['max']:.1f} ms  "
              f"({r['n']} status events; {r['received']}/{r['expected']} events received)   target p50 < 20 ms, p99 < 100 ms")

    period = 10.0 if quick else 600.0
    print(f"\n2. CPU over {period:.0f} s")
    for notify in ("inotify", "poll"):
        print(f"   idle events --follow ({notify}): {idle_cpu(period, notify):.3f} s CPU   (target < 1 s over 600 s)")
    one_round = polling_cpu(200)
    rounds = period / 2.0
    print(f"   polling `status` for 200 runs every 2 s: {one_round:.2f} s CPU per round x {rounds:.0f} rounds = {one_round * rounds:.1f} s CPU")

    if "--skip-overhead" not in sys.argv:
        overhead_section(quick)
    n = 100_000 if quick else 1_000_000
    print(f"\n4. events --from-start --json over {n:,} events")
    rate, rss, mbps, floor = many_events(n)
    print(f"   {rate:,.0f} events/s ({mbps:.0f} MB/s of journal), peak RSS {rss:.0f} MiB; floor: cat of the segments {floor:.2f} s")
    return 0


def overhead_section(quick: bool) -> None:
    print("\n3. journal overhead (this tree vs the commit before events, same run)")
    wt = tempfile.mkdtemp(prefix="casruns-before-events-")
    shutil.rmtree(wt)
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", wt, BEFORE_EVENTS], check=True, capture_output=True)
    try:
        updates = 200 if quick else 1000
        burst = 50 if quick else 200
        now_u, now_b = overhead(REPO, updates, burst)
        old_u, old_b = overhead(wt, updates, burst)
        print(f"   manifest update (promote/unpromote): {now_u:.2f} ms with events, {old_u:.2f} ms before ({now_u / old_u:.2f}x)")
        print(f"   burst of {burst} submits to all terminal: {now_b:.2f} s with events, {old_b:.2f} s before ({now_b / old_b:.2f}x)")
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", wt], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
