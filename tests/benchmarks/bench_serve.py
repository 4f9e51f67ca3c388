"""Benchmark of ``casruns serve`` (spec/http.md): the API under load, and the event fan-out.

Run on demand (not a pytest test; it never asserts timings)::

    .venv/bin/python tests/benchmarks/bench_serve.py            # 10,000 runs, 100 SSE followers, 200-run burst
    .venv/bin/python tests/benchmarks/bench_serve.py --quick    # 2,000 runs, 50 followers, 100-run burst

What it does
------------
1. Builds a registry of finished runs with bench_query.build_registry (no supervisor spawned) under
   ``tempfile.mkdtemp(dir="/work")``, and starts ``casruns serve --port 0`` on it (a subprocess).
2. ``GET /api/v1/runs/{id}`` for random ids from an async httpx load generator with ``--conns``
   concurrent keep-alive connections for ``--seconds``: requests/s and latency p50/p99. (The load
   generator is Python in the same machine: on a small box it takes CPU from the server, so the figure
   is a floor.) Beside it: ``casruns status ID --json`` as a fresh process per call (median of 15),
   the orchestrator's alternative.
3. ``--followers`` SSE clients on ``/api/v1/events``, then a burst of ``--burst`` runs submitted
   (``Registry.submit(spawn=False)``, each then cancelled: two events a run) from this process.
   Delivery latency = arrival time at the client minus the event's ``time``: p50/p99/max over every
   (event, follower) pair, whether every follower got every event exactly once, and the server's RSS
   (VmRSS, and VmHWM: its peak) before and after.
4. One artifact of ``--big-mib`` MiB (1 GiB by default) downloaded whole and by a range: MiB/s and the
   server's peak RSS, which must stay flat (the body streams in 1 MiB pieces).
5. A hook for the pages: ``GET /`` (the runs page, spec/http-pages.md) median and p99 of 20 renders
   when the server has it (``--page PATH`` to measure another page); skipped on a 404.

Targets (printed beside the figures, "meets"/"MISSES"): run GET >= 500 req/s and p99 <= 50 ms;
SSE delivery p99 <= 250 ms with every event delivered once to every follower; server RSS <= 200 MiB
with 100 followers; the runs page p99 <= 200 ms at 10,000 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timed  # noqa: E402
from bench_query import build_registry  # noqa: E402

from casruns import Registry  # noqa: E402

CASRUNS = os.path.join(os.path.dirname(sys.executable), "casruns")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


class Server:
    def __init__(self, root: str) -> None:
        env = {**os.environ, "CASRUNS_HOME": root}
        self.proc = subprocess.Popen([CASRUNS, "serve", "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stderr.readline()
        m = re.search(r"(http://\S+)", line)
        if not m:
            raise SystemExit(f"server did not start: {line}")
        self.url = m.group(1)
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


async def load(url: str, ids: list[str], conns: int, seconds: float) -> tuple[int, list[float], int]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:

        async def worker(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.get(f"/api/v1/runs/{rng.choice(ids)}")
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(conns)))
        elapsed = time.perf_counter() - t0
    return int(len(lat) / elapsed), lat, errors


def event_time(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


async def sse_burst(url: str, root: str, followers: int, burst: int) -> dict:
    got: list[list[tuple[str, float]]] = [[] for _ in range(followers)]
    ready = asyncio.Event()
    connected = 0
    expected = 2 * burst
    limits = httpx.Limits(max_connections=followers + 4, max_keepalive_connections=followers + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60, read=60)) as c:

        async def follower(i: int) -> None:
            nonlocal connected
            async with c.stream("GET", "/api/v1/events") as r:
                connected += 1
                if connected == followers:
                    ready.set()
                data = None
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data:
                        ev = json.loads(data)
                        got[i].append((ev["cursor"], time.time() - event_time(ev["time"])))
                        data = None
                        if len(got[i]) >= expected:
                            return

        tasks = [asyncio.create_task(follower(i)) for i in range(followers)]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(0.5)  # the last streams' subscriptions are in place once their headers came

        def submit() -> float:
            reg = Registry(root)
            t0 = time.perf_counter()
            for _ in range(burst):
                rid = reg.submit(["true"], spawn=False, labels={"bench": "sse"})["run_id"]
                reg.cancel(rid)
            return time.perf_counter() - t0

        burst_s = await asyncio.to_thread(submit)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
    lat = [l for g in got for _, l in g]
    exact = all(len(g) == expected and len({c for c, _ in g}) == expected for g in got)
    return {"lat": lat, "exact": exact, "burst_s": burst_s, "counts": sorted({len(g) for g in got})}


def run_wrk(url: str, ids: list[str], conns: int, seconds: float, tmp: str) -> tuple[float, float]:
    script = os.path.join(tmp, "ids.lua")
    with open(script, "w") as f:
        f.write("ids = {" + ",".join(f'"{i}"' for i in ids[:2000]) + "}\n")
        f.write('request = function() return wrk.format("GET", "/api/v1/runs/" .. ids[math.random(#ids)]) end\n')
    out = subprocess.run(["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{int(seconds)}s", "--latency", "-s", script, url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
    return rps, p99


def big_download(server: Server, root: str, tmp: str, mib: int) -> None:
    """One artifact of ``mib`` MiB (random: zstd cannot shrink it) downloaded whole and by a range
    near its end: throughput and the server's peak RSS, which must not grow with the size."""
    ws = os.path.join(tmp, "ws-big")
    os.mkdir(ws)
    reg = Registry(root)
    rid = reg.submit(["sh", "-c", f'head -c {mib * 1024 * 1024} /dev/urandom > "$CASRUNS_ARTIFACTS_DIR/big.bin"'], cwd=ws)["run_id"]
    (rec,), done = reg.wait([rid], timeout=600)
    if rec["status"] != "succeeded":
        print(f"\nbig artifact: the run {rec['status']}; skipped")
        return
    before = rss(server.proc.pid)
    with httpx.Client(base_url=server.url, timeout=600) as c:
        t0 = time.perf_counter()
        n = 0
        with c.stream("GET", f"/api/v1/runs/{rid}/artifacts/big.bin") as r:
            for chunk in r.iter_raw(1 << 20):
                n += len(chunk)
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        tail = c.get(f"/api/v1/runs/{rid}/artifacts/big.bin", headers={"range": "bytes=-1024"})
        ranged = time.perf_counter() - t0
    after = rss(server.proc.pid)
    print(f"\nartifact of {mib} MiB: whole download {n / whole / 2**20:.0f} MiB/s ({whole:.1f} s, {n} bytes), "
          f"last 1 KiB by range {ranged:.1f} s (the whole blob is verified), {len(tail.content)} bytes")
    print(f"  server RSS {before[0]:.0f} MiB before, {after[0]:.0f} MiB after, peak {after[1]:.0f} MiB; "
          f"target peak <= 200 MiB whatever the size: {verdict(after[1] <= 200)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--followers", type=int)
    ap.add_argument("--burst", type=int)
    ap.add_argument("--page", default="/")
    ap.add_argument("--big-mib", type=int, help="size of the big artifact download (default 1024; --quick 128; 0 skips)")
    ap.add_argument("--install-wrk", action="store_true", help="apt-get install -y wrk when it is missing")
    args = ap.parse_args()
    n = args.runs or (2000 if args.quick else 10_000)
    followers = args.followers or (50 if args.quick else 100)
    burst = args.burst or (100 if args.quick else 200)
    if args.big_mib is None:
        args.big_mib = 128 if args.quick else 1024
    tmp = tempfile.mkdtemp(dir="/work" if os.path.isdir("/work") else None, prefix="bench-serve-")
    root = os.path.join(tmp, "reg")
    server = None
    try:
        secs, ids = build_registry(root, n)
        print(f"registry: {n} runs built in {secs:.1f} s ({os.cpu_count()} CPUs)")
        server = Server(root)
        with httpx.Client(base_url=server.url) as c:
            for rid in ids[:50]:
                c.get(f"/api/v1/runs/{rid}")  # warm
        rps, lat, errors = asyncio.run(load(server.url, ids, args.conns, args.seconds))
        p50, p99 = pct(lat, 50) * 1000, pct(lat, 99) * 1000
        print(f"\nGET /api/v1/runs/{{id}}, {args.conns} connections, {args.seconds:.0f} s: {rps} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"{errors} errors")
        if shutil.which("wrk") is None and args.install_wrk:
            subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True)
        if shutil.which("wrk"):  # a C load generator: less of the CPU goes to the client
            rps, p99 = run_wrk(server.url, ids, args.conns, args.seconds, tmp)
            print(f"  the same with wrk: {rps:.0f} req/s, p99 {p99:.1f} ms")
        else:
            print("  (wrk not installed: --install-wrk runs apt-get install -y wrk)")
        print(f"  target >= 500 req/s: {verdict(rps >= 500)}; p99 <= 50 ms: {verdict(p99 <= 50)}")
        env = {"CASRUNS_HOME": root}
        walls = []
        for rid in random.Random(2).sample(ids, 15):
            wall, _, code, _, _ = timed([CASRUNS, "status", rid, "--json"], env=env)
            walls.append(wall)
        med = statistics.median(walls) * 1000
        print(f"  beside: casruns status ID --json, a fresh process per call: median {med:.1f} ms ({1000 / med:.0f} calls/s in one stream)")

        rss0 = rss(server.proc.pid)
        res = asyncio.run(sse_burst(server.url, root, followers, burst))
        rss1 = rss(server.proc.pid)
        lat = [x * 1000 for x in res["lat"]]
        print(f"\nSSE: {followers} followers, burst of {burst} runs ({2 * burst} events) submitted in {res['burst_s']:.2f} s")
        print(f"  delivery latency (arrival - event time): p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {max(lat, default=0):.1f} ms "
              f"over {len(lat)} deliveries")
        print(f"  every follower got every event once: {res['exact']} (events per follower: {res['counts']})")
        print(f"  server RSS: {rss0[0]:.0f} MiB before, {rss1[0]:.0f} MiB after, peak {rss1[1]:.0f} MiB")
        print(f"  target p99 <= 250 ms: {verdict(pct(lat, 99) <= 250)}; exactly once: {verdict(res['exact'])}; "
              f"RSS <= 200 MiB: {verdict(rss1[1] <= 200)}")

        if args.big_mib:
            big_download(server, root, tmp, args.big_mib)

        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.get(args.page)
            if r.status_code == 404 or not r.headers.get("content-type", "").startswith("text/html"):
                print(f"\npage {args.page}: not served here yet ({r.status_code}); the pages hook is skipped")
            else:
                times = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    c.get(args.page)
                    times.append(time.perf_counter() - t0)
                p99 = pct(times, 99) * 1000
                print(f"\npage {args.page} at {n} runs: median {statistics.median(times) * 1000:.1f} ms, p99 {p99:.1f} ms; "
                      f"target p99 <= 200 ms: {verdict(p99 <= 200)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
